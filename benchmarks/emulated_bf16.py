"""What `--precision bf16` costs on a CPU without native bf16 (no AVX512-BF16, no AMX): resnetlab's training step
in fp32 (the default) and in bf16 autocast, channels_last, on the same random CIFAR batch, taking turns in rounds.

    python benchmarks/emulated_bf16.py --model resnet20 --batch-size 128 --seconds 10 --rounds 3

There torch runs bf16 convolutions on slow generic kernels; `resnetlab train --precision bf16` warns of it. On a
CPU with native bf16 this measures the real bf16 path instead (the header line says which). Prints images/s (median
over rounds, min-max) and the ratio to fp32.
"""

import argparse
import statistics
import time

import torch

from resnetlab.factory import create_model
from resnetlab.precision import cpu_has_bf16
from resnetlab.train import training_step


def step_function(model_name: str, precision: str, batch_size: int):
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    return lambda: training_step(model, optimizer, x, y, device=torch.device("cpu"), precision=precision).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per precision per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    steps = {precision: step_function(args.model, precision, args.batch_size) for precision in ("fp32", "bf16")}
    for step in steps.values():  # warm-up: allocator, kernel choice
        step()
    rates = {precision: [] for precision in steps}
    for _ in range(args.rounds):
        for precision, step in steps.items():
            count, start = 0, time.perf_counter()
            while count == 0 or time.perf_counter() - start < args.seconds:
                step()
                count += 1
            rates[precision].append(count * args.batch_size / (time.perf_counter() - start))
    print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{'native' if cpu_has_bf16() else 'emulated (no native bf16 on this CPU)'} bf16")
    print("| precision | images/s (min-max) | x fp32 |\n| --- | --- | --- |")
    fp32 = statistics.median(rates["fp32"])
    for precision, values in rates.items():
        median = statistics.median(values)
        print(f"| {precision} | {median:.1f} ({min(values):.1f}-{max(values):.1f}) | {median / fp32:.3f} |")


if __name__ == "__main__":
    main()
