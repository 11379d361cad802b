"""The `resnetlab` command: argparse subcommands that call library functions and print; no logic of its own."""

from __future__ import annotations

import argparse
import sys


def cmd_models(args: argparse.Namespace) -> int:
    from resnetlab.complexity import model_table

    rows = model_table(stride_in_1x1=args.stride_in_1x1)
    form = "stride on the first 1x1 (paper)" if args.stride_in_1x1 else "stride on the 3x3 (torchvision)"
    print(f"ImageNet nets at 3x224x224, bottleneck {form}; CIFAR nets at 3x32x32. MACs = multiply-adds.")
    print(f"{'model':<11} {'family':<9} {'depth':>5} {'shortcut':>8} {'params':>12} {'GMACs':>8}  paper")
    for row in rows:
        paper = "" if row["paper"] is None else f"{row['paper']} {row['paper_unit']}"
        print(f"{row['name']:<11} {row['family']:<9} {row['depth']:>5} {row['shortcut']:>8} "
              f"{row['params']:>12,} {row['gmacs']:>8.3f}  {paper}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from resnetlab.recipes import RECIPE_KEYS, RUN_KEYS, resolve_config
    from resnetlab.train import resume_config, train

    if args.resume:
        config = resume_config(args.resume)
    else:
        overrides = {key: getattr(args, key) for key in RUN_KEYS + RECIPE_KEYS if hasattr(args, key)}
        config = resolve_config(args.recipe, args.config, **overrides)
        if not config.model or not config.data:
            raise ValueError("--model and --data are required (or give them in --config FILE.toml)")
    summary = train(config, resume=bool(args.resume), progress=not args.quiet)
    print(f"{summary['model']} on {summary['dataset']}: {summary['iterations']} iterations in "
          f"{summary['wall_seconds']:.0f} s ({summary['images_per_second']:.0f} images/s); "
          f"train error {100 * summary['train_top1_error']:.2f}%, test error {100 * summary['test_top1_error']:.2f}% "
          f"(top-5 {100 * summary['test_top5_error']:.2f}%)")
    print(f"wrote {config.out}/summary.json, checkpoint.pt, model.safetensors, metrics.jsonl")
    return 0


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a training run; None means "not given", so presets and TOML files keep their values."""
    p.add_argument("--model", help="a name from `resnetlab models`, e.g. resnet20")
    p.add_argument("--data", help="cifar10:PATH, cifar100:PATH, mnist:PATH, folder:PATH or digits")
    p.add_argument("--out", help="the run directory (created)")
    p.add_argument("--recipe", default="cifar", help="preset: cifar (default) or imagenet")
    p.add_argument("--config", metavar="FILE.toml", help="settings from a TOML file; flags override it")
    p.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its checkpoint")
    p.add_argument("--iterations", type=int, help="total iterations; the lr milestones scale with it")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--val-size", type=int, help="training images held out for validation (paper CIFAR: 5000)")
    p.add_argument("--shortcut", choices=["A", "B", "C"], help="residual shortcut option (paper Sec. 3.3)")
    p.add_argument("--precision", help="fp32 or bf16")
    p.add_argument("--device", help="auto (default: CUDA when present), cpu or cuda")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--checkpoint-every", type=int, metavar="K")
    p.add_argument("--eval-every", type=int, metavar="K")
    p.add_argument("--log-every", type=int, metavar="K")
    p.add_argument("--workers", type=int, help="DataLoader processes for image folders")
    p.add_argument("--download", action="store_true", default=None, help="fetch CIFAR/MNIST if missing")
    p.add_argument("--sync-bn", action="store_true", default=None, help="distributed: BN statistics over all processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnetlab", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="table of every named model: params and MACs beside the paper's figures")
    p.add_argument("--stride-in-1x1", action="store_true",
                   help="bottleneck stride on the first 1x1 as in the paper (default: on the 3x3, as torchvision)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a model with one of the paper's recipes")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, RuntimeError) as error:
        print(f"resnetlab {args.command}: error: {error}", file=sys.stderr)
        return 2
