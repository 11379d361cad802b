"""Peak resident memory (RSS) of training CIFAR nets at batch 128 on 32x32, with and without activation checkpointing.

Each configuration runs in a fresh subprocess (ru_maxrss is a per-process high-water mark) that takes `--steps`
SGD steps of the project's training step on random images and reports resource.getrusage's ru_maxrss. The ratio
is to the first configuration of the same model. "+checkpointing" is `resnetlab train --activation-checkpointing`
(`model.activation_checkpointing = True`): each stage is cut into about sqrt(blocks) segments, only the segment
boundaries are kept for the backward pass, and each segment's forward runs again during it (about 1/3 more compute).

    python benchmarks/memory.py --models resnet110 resnet1202 --configs fp32 bf16 bf16+checkpointing

fp32 resnet1202 without checkpointing needs ~15 GiB (11x resnet110's activations): run it only on a machine with
that much free memory.
"""

import argparse
import itertools
import json
import resource
import subprocess
import sys

import torch

from resnetlab.bench import next_step
from resnetlab.factory import create_model

CONFIGS = ("fp32", "bf16", "fp32+checkpointing", "bf16+checkpointing")


def measure(model_name: str, config: str, batch_size: int, steps: int) -> dict:
    precision, _, checkpointing = config.partition("+")
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(memory_format=torch.channels_last).train()
    model.activation_checkpointing = bool(checkpointing)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    batches = itertools.repeat((x, y))
    for _ in range(steps):
        next_step(model, optimizer, batches, precision=precision, layout=torch.channels_last)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"model": model_name, "config": config, "peak_rss_gib": peak / 2**20, "before_steps_gib": before / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet110", "resnet1202"])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=["fp32", "bf16", "bf16+checkpointing"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child, args.batch_size, args.steps)))
        return

    print(f"torch {torch.__version__}; batch {args.batch_size}, 3x32x32, {args.steps} SGD steps per configuration")
    print(f"{'model':<11} {'configuration':<20} {'peak RSS GiB':>12} {'x first':>8} {'RSS before steps':>17}")
    for model in args.models:
        first = None
        for config in args.configs:
            child = subprocess.run([sys.executable, __file__, "--child", model, config, "--batch-size",
                                    str(args.batch_size), "--steps", str(args.steps)],
                                   capture_output=True, text=True)
            if child.returncode != 0:
                print(f"{model:<11} {config:<20} failed (exit {child.returncode}): {child.stderr.strip()[-200:]}")
                continue
            result = json.loads(child.stdout)
            first = first or result["peak_rss_gib"]
            print(f"{model:<11} {config:<20} {result['peak_rss_gib']:>12.2f} {result['peak_rss_gib'] / first:>8.2f} "
                  f"{result['before_steps_gib']:>17.2f}", flush=True)


if __name__ == "__main__":
    main()
