"""The cost of reading the loss every step: the training step with a host read after each step (how the loop ran
before) against a read every `--log-every` steps (how it runs now), side by side in rounds.

    python benchmarks/step_sync.py --model resnet20 --steps 50 --rounds 5

Both sides run `resnetlab.train.training_step` on the same random batch on the device `resnetlab train` would pick
(CUDA when present). On a CPU every op has finished when it returns, so the read costs next to nothing; on a GPU
the read makes the host wait for the device, so the host cannot queue the next step's kernels while the device runs.
Prints ms per step (median over rounds, min-max) and the ratio to the every-step read.
"""

import argparse
import statistics
import time

import torch

from resnetlab.factory import create_model
from resnetlab.precision import pick_device
from resnetlab.train import training_step


def steps_per_second(model_name: str, device: torch.device, steps: int, read_every: int, batch_size: int) -> float:
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10).to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x = torch.randn(batch_size, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)
    for _ in range(3):  # warm-up: allocator, kernel choice
        training_step(model, optimizer, x, y, device=device, precision="fp32").tolist()
    window = torch.zeros(2, dtype=torch.float64, device=device)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        window += training_step(model, optimizer, x, y, device=device, precision="fp32")
        if step % read_every == 0:
            window.tolist()
    window.tolist()  # every step has finished before the clock stops
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args()
    device = pick_device("auto")
    paths = {"read every step (before)": 1, f"read every {args.log_every} steps (now)": args.log_every}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):  # alternate, so a machine shared with other work slows both alike
        for name, read_every in paths.items():
            rates[name].append(steps_per_second(args.model, device, args.steps, read_every, args.batch_size))
    baseline = statistics.median(rates["read every step (before)"])
    print(f"{args.model}, batch {args.batch_size}, {device}, torch {torch.__version__}, "
          f"{args.rounds} rounds of {args.steps} steps")
    print("| path | ms per step (median) | min-max | speed vs before |\n|---|---|---|---|")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {1000 / median:.1f} | {1000 / max(values):.1f}-{1000 / min(values):.1f} | "
              f"{median / baseline:.2f}x |")


if __name__ == "__main__":
    main()
