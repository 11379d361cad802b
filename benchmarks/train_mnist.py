"""Training time of the README's training command on real data: resnet20 on MNIST for 300 iterations, as a user
would start it.

    python benchmarks/train_mnist.py [--repeats N] [--data mnist:PATH] [--iterations 300] [-- EXTRA TRAIN FLAGS]

Each repeat runs `resnetlab train --model resnet20 --data mnist:../shared/data/mnist --val-size 0
--iterations 300` in a fresh temporary directory and prints a row: the wall seconds of the whole command
(start-up, data loading and the final evaluation included), the training loop's seconds and images/s from
summary.json, and the final train and test top-1 errors. The shared MNIST folder holds only the t10k files, so
load_dataset splits them 8,000 train / 2,000 test (stratified, fixed seed): the errors are on those 2,000 images.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def train_once(data: str, iterations: int, extra: list[str]) -> dict:
    """One `resnetlab train` in a temporary directory: its summary.json plus the command's wall seconds."""
    with tempfile.TemporaryDirectory(prefix="resnetlab-bench-") as out:
        command = [sys.executable, "-m", "resnetlab", "train", "--model", "resnet20", "--data", data,
                   "--val-size", "0", "--iterations", str(iterations), "--out", out, "--quiet", *extra]
        start = time.perf_counter()
        finished = subprocess.run(command, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if finished.returncode != 0:
            sys.exit(f"{' '.join(command)} failed (exit {finished.returncode}):\n{finished.stderr}")
        return {**json.loads((Path(out) / "summary.json").read_text()), "command_seconds": wall}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--data", default=f"mnist:{SHARED_MNIST}")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("extra", nargs="*", help="more `resnetlab train` flags, after --")
    args = parser.parse_args(argv)
    print(f"resnet20, {args.data}, {args.iterations} iterations, {args.repeats} repeat(s)")
    print(f"{'run':>3} {'wall s':>8} {'train s':>8} {'images/s':>9} {'train err':>9} {'test err':>9}  device")
    for repeat in range(1, args.repeats + 1):
        summary = train_once(args.data, args.iterations, args.extra)
        print(f"{repeat:>3} {summary['command_seconds']:>8.1f} {summary['wall_seconds']:>8.1f} "
              f"{summary['images_per_second']:>9.0f} {100 * summary['train_top1_error']:>8.2f}% "
              f"{100 * summary['test_top1_error']:>8.2f}%  {summary['device']}, torch {summary['torch']}",
              flush=True)


if __name__ == "__main__":
    main()
