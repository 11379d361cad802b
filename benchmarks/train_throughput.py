"""Training throughput, end to end (augmentation included), of the CIFAR nets beside the reference loop.

Each model is one `resnetlab bench train` measurement: the reference (fp32, NCHW, eager, per-image augmentation
in 2 DataLoader workers, as popular CIFAR reproductions run), the project's default path and, where the CPU has
native bf16 and the default is fp32, the bf16 path; they take turns in 3 rounds in the same process.
With --plain-bf16, one more row: the bf16 path with a bf16 residual stream (plain autocast, as before the
stream was kept in fp32: `ResNet.fp32_residual_stream = False`), to show what keeping the stream in fp32 costs
in speed.

    python benchmarks/train_throughput.py --models resnet20 resnet56 resnet110 --seconds 60 [--plain-bf16]
"""

import argparse

from resnetlab.bench import bench_train, format_table

PAPER_SCHEDULE_IMAGES = 64_000 * 128  # the paper's CIFAR schedule: 64k iterations of batch 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet56", "resnet110"])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=60.0, help="time per path, over 3 rounds")
    parser.add_argument("--plain-bf16", action="store_true", help="add the plain-autocast bf16 row")
    args = parser.parse_args()
    for model in args.models:
        summary = bench_train(model, args.batch_size, args.seconds, plain_bf16=args.plain_bf16)
        print(format_table(summary))
        for row in summary["paths"]:
            hours = PAPER_SCHEDULE_IMAGES / row["images_per_second"] / 3600
            print(f"  {row['path']}: the paper's 64k-iteration schedule would take {hours:.1f} h")
        print(flush=True)


if __name__ == "__main__":
    main()
