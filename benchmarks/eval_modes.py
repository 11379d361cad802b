"""Top-1/top-5 error and time of the three testing modes on one checkpoint of a small-image net (CIFAR, MNIST),
and each mode's time against center's: the figures behind `resnetlab evaluate --mode`.

Each mode runs `evaluate.mode_probabilities` on the same test images, one after the other in one process. A mode's
"center-equivalent views" are what it costs in center passes if time follows pixels: 10 for 10crop, the summed
areas of the five scales over the training area for multiscale. Then the 10 crops are split into the 5 plain and
the 5 mirrored ones, each half averaged on its own. `resnetlab evaluate` refuses multiscale to such nets, and
10crop to data never mirrored in training; they are computed here because this is the measurement behind that.

    python benchmarks/eval_modes.py runs/x --images 1000 [--data SPEC] [--batch-size 500]
"""

import argparse
import time

import torch
import torch.nn.functional as F

from resnetlab.data import ArrayDataset, load_dataset
from resnetlab.data.augment import Normalize, ten_crops
from resnetlab.data.batches import padding_for
from resnetlab.evaluate import MODES, mode_probabilities, multiscale_sides, top_k_error, training_side
from resnetlab.factory import load_model


def center_equivalent_views(mode: str, side: int) -> float:
    if mode == "center":
        return 1.0
    if mode == "10crop":
        return 10.0
    return sum((scale / side) ** 2 for scale in multiscale_sides(side))


@torch.no_grad()
def plain_and_mirrored_errors(model: torch.nn.Module, test: ArrayDataset, normalize: Normalize, padding: int,
                              images: int) -> tuple[float, float]:
    """Top-1 error of the mean over the 5 plain crops of 10crop, and over the 5 mirrored ones."""
    size = test.images.shape[-1]
    pad = padding_for(size, padding)
    crops = ten_crops(F.pad(test.images[:images], (pad, pad, pad, pad)), size)  # (10, N, C, size, size)
    views = torch.stack([model.eval()(normalize(view)).softmax(1) for view in crops])
    labels = test.labels[:images]
    return top_k_error(views[:5].mean(0), labels, 1), top_k_error(views[5:].mean(0), labels, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a run directory or checkpoint.pt of a net trained on array images")
    parser.add_argument("--data", help="dataset spec (default: the one the checkpoint was trained on)")
    parser.add_argument("--images", type=int, default=1000, help="the first N test images")
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    model, state = load_model(args.checkpoint)
    normalize = Normalize.from_state_dict(state["normalize"])
    test = load_dataset(args.data or state["config"]["data"]).test
    side = training_side(normalize)
    print(f"{args.checkpoint}: {len(test)} test images, first {args.images}; {side}x{side} training inputs; "
          f"{torch.get_num_threads()} torch threads")
    print("| mode | top-1 error | top-5 error | seconds | center-equivalent views | time / (views x center time) |")
    print("| --- | --- | --- | --- | --- | --- |")
    center_seconds = None
    for mode in MODES:
        start = time.perf_counter()
        scores, labels = mode_probabilities(model, test, normalize, mode, device=torch.device("cpu"),
                                            padding=state["config"]["recipe"]["padding"],
                                            batch_size=args.batch_size, limit=args.images)
        seconds = time.perf_counter() - start
        center_seconds = center_seconds or seconds
        views = center_equivalent_views(mode, side)
        print(f"| {mode} | {100 * top_k_error(scores, labels, 1):.2f}% | {100 * top_k_error(scores, labels, 5):.2f}% "
              f"| {seconds:.1f} | {views:.1f} | {seconds / (views * center_seconds):.2f} |", flush=True)
    plain, mirrored = plain_and_mirrored_errors(model, test, normalize, state["config"]["recipe"]["padding"],
                                                args.images)
    print(f"10crop's 5 plain crops alone: {100 * plain:.2f}% top-1 error; its 5 mirrored crops alone: "
          f"{100 * mirrored:.2f}%")


if __name__ == "__main__":
    main()
