"""Does bf16 cost accuracy? fp32 vs bf16 (fp32 residual stream, the project's bf16) vs plain bf16 autocast.

Part 1 (seconds): how far one training step's logits and weight gradients are from an fp64 computation, by
depth, at initialization: the rounding each precision adds, before any training compounds it.
Part 2 (the MNIST probe): training runs.

The MNIST probe: the real MNIST split (8,000 train / 2,000 test), the CIFAR recipe cut to 300 iterations
(lr 0.1, batch 128, milestones scaled to 150/225), the same seed for every precision. "bf16-plain" is bf16 autocast
with the residual addition done in the convs' dtype, i.e. a bf16 residual stream: the behaviour before the stream
was kept in fp32, reproduced here by turning the blocks' `fp32_residual_stream` off during that run.
"bf16-bn-fp32" (an experiment, not a default variant) also runs every BN on an fp32 copy of its input.

    python benchmarks/precision.py --models resnet56 resnet110 --seeds 0 1 --processes 3 --jsonl /tmp/precision.jsonl

Part 2 prints one row per run as it ends, then mean and spread (max - min) over seeds per model and precision.
With --processes N, N runs go at once, each in its own process with --threads torch threads (default 1):
on a CPU shared with other work this uses the cores better than one 2-thread run at a time. Wall times are
then not comparable between precisions; `resnetlab bench train` measures speed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import copy
import json
import multiprocessing
import statistics
import tempfile

import torch
import torch.nn.functional as F

from resnetlab import models
from resnetlab.factory import create_model
from resnetlab.precision import autocast
from resnetlab.recipes import resolve_config
from resnetlab.train import train

VARIANTS = ("fp32", "bf16", "bf16-plain", "bf16-bn-fp32")


@contextlib.contextmanager
def bf16_residual_stream():
    """Every residual addition in the convs' dtype (bf16 under autocast), as plain autocast does: the blocks'
    fp32_residual_stream off by default meanwhile, also in the models `train` builds."""
    blocks = (models.BasicBlock, models.Bottleneck)
    for block in blocks:
        block.fp32_residual_stream = False
    try:
        yield
    finally:
        for block in blocks:
            block.fp32_residual_stream = True


def step_outputs(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str):
    """Logits and the flattened weight gradient of one training-mode step on a copy of `model`."""
    model = copy.deepcopy(model)
    with autocast(x.device, precision):
        logits = model(x)
    F.cross_entropy(logits.to(x.dtype), y).backward()
    return logits.to(torch.float64), torch.cat([p.grad.reshape(-1).to(torch.float64) for p in model.parameters()])


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()


def rounding_errors(model_name: str, variant: str, batch_size: int = 32, seed: int = 0) -> tuple[float, float]:
    """Relative error of the logits and of the weight gradients against fp64, for one batch of random images."""
    torch.manual_seed(seed)
    model = create_model(model_name).train()
    x, y = torch.randn(batch_size, 3, 32, 32), torch.randint(0, 10, (batch_size,))
    logits64, grads64 = step_outputs(model.double(), x.double(), y, "fp32")
    with variant_patch(variant):
        logits, grads = step_outputs(model.float(), x, y, "fp32" if variant == "fp32" else "bf16")
    return relative_error(logits, logits64), relative_error(grads, grads64)


@contextlib.contextmanager
def fp32_batchnorm():
    """An experiment, not the project's path: every BN normalizes an fp32 copy of its bf16 input, returning fp32."""
    kept = torch.nn.BatchNorm2d.forward
    torch.nn.BatchNorm2d.forward = lambda self, x: kept(self, x.float())
    try:
        yield
    finally:
        torch.nn.BatchNorm2d.forward = kept


def variant_patch(variant: str) -> contextlib.AbstractContextManager:
    return {"bf16-plain": bf16_residual_stream, "bf16-bn-fp32": fp32_batchnorm}.get(variant, contextlib.nullcontext)()


def run_one(model: str, variant: str, seed: int, data: str, iterations: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        config = resolve_config("cifar", model=model, data=data, out=out, iterations=iterations, seed=seed,
                                precision="fp32" if variant == "fp32" else "bf16")
        with variant_patch(variant):
            summary = train(config, progress=False)
        with open(f"{out}/metrics.jsonl") as file:
            curve = [(record["iteration"], record["train_error"]) for record in map(json.loads, file)]
    return {"model": model, "precision": variant, "seed": seed, "iterations": iterations,
            "train_error": summary["train_top1_error"], "test_error": summary["test_top1_error"],
            "left_chance_at": left_chance_at(curve), "train_error_curve": curve,
            "wall_seconds": summary["wall_seconds"]}


def left_chance_at(curve: list[tuple[int, float]], threshold: float = 0.7) -> int | None:
    """The first logged iteration whose training error (over the last 10 batches) is below `threshold`.
    Deep nets at lr 0.1 first blow up and then sit near chance (90% error on 10 classes) for a number of
    iterations that varies from run to run; after 300 iterations the final error mostly reflects this."""
    return next((iteration for iteration, error in curve if error < threshold), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet56"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:3]))
    parser.add_argument("--data", default="mnist:../shared/data/mnist")
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--processes", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jsonl", help="also append each run's result to this file")
    parser.add_argument("--skip-training", action="store_true", help="part 1 only")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {args.processes} processes x {args.threads} threads; data {args.data}, "
          f"{args.iterations} iterations, CIFAR recipe (lr 0.1, batch 128)")
    print("\nPart 1: one training step at initialization (batch 32, random 3x32x32 images) against fp64")
    print(f"{'model':<10} {'precision':<11} {'logits rel. error':>18} {'gradient rel. error':>20}")
    for model in args.models:
        for variant in args.variants:
            logits_error, gradient_error = rounding_errors(model, variant)
            print(f"{model:<10} {variant:<11} {logits_error:>18.2e} {gradient_error:>20.2e}", flush=True)
    if args.skip_training:
        return

    print("\nPart 2: training runs")
    print(f"{'model':<10} {'precision':<11} {'seed':>4} {'train err %':>11} {'test err %':>10} "
          f"{'error < 70% from':>16} {'wall s':>7}")
    # Seeds outermost: an interrupted run still has every precision for the first seeds.
    jobs = [(model, variant, seed) for seed in args.seeds for model in args.models for variant in args.variants]
    results = []
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.processes, mp_context=spawn) as pool:
        futures = [pool.submit(run_one, *job, args.data, args.iterations, args.threads) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            result = future.result()
            results.append(result)
            print(f"{result['model']:<10} {result['precision']:<11} {result['seed']:>4} "
                  f"{100 * result['train_error']:>11.2f} {100 * result['test_error']:>10.2f} "
                  f"{str(result['left_chance_at']):>16} {result['wall_seconds']:>7.0f}", flush=True)
            if args.jsonl:
                with open(args.jsonl, "a") as file:
                    file.write(json.dumps(result) + "\n")

    print(f"\n{'model':<10} {'precision':<11} {'seeds':>5} {'train err % mean (spread)':>26} "
          f"{'test err % mean (spread)':>25}")
    for model in args.models:
        for variant in args.variants:
            runs = [r for r in results if r["model"] == model and r["precision"] == variant]
            cells = []
            for key in ("train_error", "test_error"):
                values = [100 * r[key] for r in runs]
                cells.append(f"{statistics.mean(values):.2f} ({max(values) - min(values):.2f})")
            print(f"{model:<10} {variant:<11} {len(runs):>5} {cells[0]:>26} {cells[1]:>25}")


if __name__ == "__main__":
    main()
