"""Training throughput of the ImageNet networks at each resolution factor: what picks the Imagenette budget.

    python benchmarks/imagenet_sizes.py --models resnet18,resnet34 --resolutions 0.25,0.5,0.75,1 --precisions fp32

The default training step (`train.training_step`: channels_last, SGD with momentum) of each network on a fixed
synthetic batch of crops of the recipe's crop size times the factor (224 at 1), 10 classes, shortcut A as in the
paper's Table 2. Each row times `--steps` steps after 2 warm-up steps; the ratio column is against the first row,
measured in the same run. Run it on a quiet machine: it measures the CPU, and anything else running moves it.
"""

from __future__ import annotations

import argparse
import time

import torch

import resnetlab
from resnetlab.data.augment import ImageSizes
from resnetlab.train import training_step

CPU = torch.device("cpu")


def images_per_second(model_name: str, crop: int, precision: str, batch_size: int, steps: int) -> float:
    torch.manual_seed(0)
    model = resnetlab.create_model(model_name, num_classes=10, shortcut="A").to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, crop, crop).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    for _ in range(2):
        training_step(model, optimizer, x, y, device=CPU, precision=precision).tolist()
    started = time.perf_counter()
    for _ in range(steps):
        training_step(model, optimizer, x, y, device=CPU, precision=precision).tolist()
    return steps * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,resnet34")
    parser.add_argument("--resolutions", default="0.25,0.5,0.75,1")
    parser.add_argument("--precisions", default="fp32", help="fp32 and/or bf16 (bf16 only where the CPU has it)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}, {args.steps} steps")
    print(f"{'model':<9} {'factor':>6} {'crop':>5} {'precision':>9} {'images/s':>9} {'ratio':>6}")
    baseline = None
    for precision in args.precisions.split(","):
        for resolution in map(float, args.resolutions.split(",")):
            crop = ImageSizes.scaled(resolution).crop
            for model_name in args.models.split(","):
                rate = images_per_second(model_name, crop, precision, args.batch_size, args.steps)
                baseline = baseline or rate
                print(f"{model_name:<9} {resolution:>6g} {crop:>5} {precision:>9} {rate:>9.1f} {rate / baseline:>6.2f}",
                      flush=True)


if __name__ == "__main__":
    main()
