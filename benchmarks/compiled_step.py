"""Does torch.compile speed up a CPU training step? Eager against Inductor, side by side, and the weights they reach.

    python benchmarks/compiled_step.py --model resnet20 --steps 10 --rounds 3

Three ways to run the default training step (fp32, channels_last, batch 128, SGD with the cifar recipe's momentum
and weight decay) on a fixed synthetic batch:
- eager: `train.training_step`, what `resnetlab train` runs;
- compiled model: the same step with the model wrapped in torch.compile (forward and backward by Inductor), what
  `resnetlab train --compile` runs;
- compiled step: forward, loss, backward and the SGD update as one compiled function.
Each path first runs 3 steps from the same initial weights on the same batches; the largest weight difference
from eager afterwards says whether the path trains the same network (float rounding only). Then the paths take
turns, `--rounds` rounds of `--steps` steps each, after 3 warm-up steps that include the compilation.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from resnetlab.factory import create_model
from resnetlab.recipes import RECIPES
from resnetlab.train import training_step

CPU = torch.device("cpu")


def make_paths(model_name: str, batch_size: int) -> tuple[dict[str, Callable[[], None]], dict[str, torch.nn.Module]]:
    torch.manual_seed(0)
    recipe = RECIPES["cifar"]
    initial = create_model(model_name, num_classes=10).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,))
    paths, models = {}, {}

    def optimizer_of(model: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=recipe.momentum, weight_decay=recipe.weight_decay)

    eager = copy.deepcopy(initial)
    eager_optimizer = optimizer_of(eager)
    paths["eager (train.training_step)"] = lambda: training_step(eager, eager_optimizer, x, y, device=CPU,
                                                                 precision="fp32").tolist()
    models["eager (train.training_step)"] = eager

    compiled_model = copy.deepcopy(initial)
    compiled_model_optimizer = optimizer_of(compiled_model)
    wrapped = torch.compile(compiled_model)
    paths["compiled model (train --compile)"] = lambda: training_step(
        wrapped, compiled_model_optimizer, x, y, device=CPU, precision="fp32").tolist()
    models["compiled model (train --compile)"] = compiled_model

    whole = copy.deepcopy(initial)
    whole_optimizer = optimizer_of(whole)

    @torch.compile
    def whole_step() -> torch.Tensor:
        logits = whole(x)
        loss = F.cross_entropy(logits, y)
        whole_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        whole_optimizer.step()
        return loss.detach()

    paths["compiled step (forward, backward, SGD)"] = lambda: whole_step().tolist()
    models["compiled step (forward, backward, SGD)"] = whole
    return paths, models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="steps per path per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    paths, models = make_paths(args.model, args.batch_size)
    for step in paths.values():  # the same 3 steps from the same weights: the equality check, and the warm-up
        for _ in range(3):
            step()
    reference = dict(next(iter(models.values())).named_parameters())
    differences = {name: max((p - reference[key]).abs().max().item() for key, p in model.named_parameters())
                   for name, model in models.items()}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, step in paths.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            rates[name].append(args.steps * args.batch_size / (time.perf_counter() - start))
    baseline = statistics.median(next(iter(rates.values())))
    print(f"{args.model}, batch {args.batch_size}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'path':<42} {'images/s':>9} {'(min-max)':>13} {'x eager':>8} {'max |weight - eager| after 3 steps':>36}")
    for name, values in rates.items():
        median = statistics.median(values)
        spread = f"({min(values):.0f}-{max(values):.0f})"
        print(f"{name:<42} {median:>9.1f} {spread:>13} {median / baseline:>8.2f} {differences[name]:>36.1e}")


if __name__ == "__main__":
    main()
