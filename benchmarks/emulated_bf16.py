"""What `--precision bf16` costs on a CPU without native bf16 (no AVX512-BF16, no AMX): resnetlab's training step
in fp32 (the default) and in bf16 autocast, channels_last, on the same random CIFAR batch, taking turns in rounds.

    python benchmarks/emulated_bf16.py --model resnet20 --batch-size 128 --seconds 30

There torch runs bf16 convolutions on slow generic kernels; `resnetlab train --precision bf16` warns of it. On a
CPU with native bf16 this measures the real bf16 path instead (the header line says which). The two take turns in 3
rounds (`resnetlab bench`'s timing); prints images/s (median over rounds, min-max) and the ratio to fp32.
"""

import argparse

import torch

from resnetlab.bench import take_turns
from resnetlab.factory import create_model
from resnetlab.precision import cpu_has_bf16
from resnetlab.train import training_step


def step_function(model_name: str, precision: str, batch_size: int):
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))

    def step() -> int:
        training_step(model, optimizer, x, y, device=torch.device("cpu"), precision=precision).tolist()
        return batch_size

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=30.0, help="time per precision, over 3 rounds")
    args = parser.parse_args()
    results = take_turns({precision: step_function(args.model, precision, args.batch_size)
                          for precision in ("fp32", "bf16")}, args.seconds)
    print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{'native' if cpu_has_bf16() else 'emulated (no native bf16 on this CPU)'} bf16")
    print("| precision | images/s (min-max) | x fp32 |\n| --- | --- | --- |")
    rows = [result.summary(flops_per_image=0) for result in results]
    for row in rows:
        print(f"| {row['path']} | {row['images_per_second']:.1f} ({row['min']:.1f}-{row['max']:.1f}) | "
              f"{row['images_per_second'] / rows[0]['images_per_second']:.3f} |")


if __name__ == "__main__":
    main()
