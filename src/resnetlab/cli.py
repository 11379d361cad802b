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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnetlab", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="table of every named model: params and MACs beside the paper's figures")
    p.add_argument("--stride-in-1x1", action="store_true",
                   help="bottleneck stride on the first 1x1 as in the paper (default: on the 3x3, as torchvision)")
    p.set_defaults(func=cmd_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError) as error:
        print(f"resnetlab {args.command}: error: {error}", file=sys.stderr)
        return 2
