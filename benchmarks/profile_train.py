"""Where a resnet20 training step spends its time: torch.profiler's table of the top ops, per path.

    python benchmarks/profile_train.py --model resnet20 --steps 3
"""

import argparse

import torch

from resnetlab.bench import train_paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    for name, step in train_paths(args.model, args.batch_size).items():
        step()  # warm-up: the first step allocates and picks kernels
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            for _ in range(args.steps):
                step()
        print(f"\n{args.model}, batch {args.batch_size}, {args.steps} steps: {name}")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)


if __name__ == "__main__":
    main()
