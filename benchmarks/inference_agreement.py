"""How far the fast inference path moves a trained model's answers: top-1 agreement with the fp32 model.

    python benchmarks/inference_agreement.py RUN_DIR [RUN_DIR ...] [--data SPEC]

For each checkpoint, the test split of its dataset (or --data) is scored four ways: the model as trained (fp32,
BN separate), `export.fast_inference` in fp32 (BN folded, channels_last) and in bf16, and `--precision int8`
(`quantize`, calibrated on the run's own training images; left out without ONNX Runtime). Each row gives the share
of images whose top-1 class equals the fp32 model's, the largest logit difference relative to the largest
logit, and the top-1 test error. The goals (docs/benchmarks.md): bf16 and int8 top-1 agreement of at least 99% on
real images, and int8's test error within 0.5 point of fp32's.
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from resnetlab.data import load_dataset
from resnetlab.data.augment import Normalize
from resnetlab.export import fast_inference
from resnetlab.factory import load_model
from resnetlab.quantize import int8_inference, run_calibration_batch


@torch.no_grad()
def logits_of(model: torch.nn.Module, data, normalize: Normalize) -> tuple[torch.Tensor, torch.Tensor]:
    logits, labels = [], []
    for images, batch_labels in data.evaluation_batches(500):
        logits.append(model(normalize(images)).float())
        labels.append(batch_labels)
    return torch.cat(logits), torch.cat(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--data", help="dataset spec (default: the one each checkpoint was trained on)")
    args = parser.parse_args()
    print(f"{'checkpoint':<40} {'path':<16} {'images':>7} {'top-1 = fp32':>13} {'max |dlogit|':>13} {'error':>7}")
    for run in args.runs:
        model, state = load_model(run)
        model.eval()
        test = load_dataset(args.data or state["config"]["data"]).test
        normalize = Normalize.from_state_dict(state["normalize"])
        reference, labels = logits_of(model, test, normalize)
        paths = {"fp32 model": model, "fast fp32": fast_inference(model, precision="fp32"),
                 "fast bf16": fast_inference(model, precision="bf16")}
        if importlib.util.find_spec("onnxruntime"):
            paths["int8"] = int8_inference(model, run_calibration_batch(state))
        for name, network in paths.items():
            logits = reference if network is model else logits_of(network, test, normalize)[0]
            agreement = (logits.argmax(1) == reference.argmax(1)).float().mean().item()
            difference = ((logits - reference).abs().max() / reference.abs().max()).item()
            error = (logits.argmax(1) != labels).float().mean().item()
            print(f"{run:<40} {name:<16} {len(labels):>7} {100 * agreement:>12.2f}% {difference:>13.1e} "
                  f"{100 * error:>6.2f}%")


if __name__ == "__main__":
    main()
