"""The `resnetlab` command: argparse subcommands that call library functions and print; no logic of its own."""

from __future__ import annotations

import argparse
import re
import signal
import sys

from resnetlab.errors import ResnetlabError, RunStopped
from resnetlab.precision import EXPORT_PRECISIONS, INFERENCE_PRECISIONS, PRECISIONS


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

    overrides = {key: getattr(args, key) for key in RUN_KEYS + RECIPE_KEYS if hasattr(args, key)}
    if args.resume:
        if args.config:
            raise ValueError("--resume continues a run with its own settings; it takes no --config FILE.toml")
        config = resume_config(args.resume, {**overrides, "recipe": args.recipe})
    else:
        config = resolve_config(args.recipe, args.config, **overrides)
        if not config.model or not config.data:
            raise ValueError("--model and --data are required (or give them in --config FILE.toml)")
    summary = train(config, resume=bool(args.resume), progress=not args.quiet)
    print(f"{summary['model']} on {summary['dataset']}: {summary['iterations']} iterations in "
          f"{summary['wall_seconds']:.0f} s ({summary['images_per_second']:.0f} images/s); "
          f"train error {100 * summary['train_top1_error']:.2f}%, test error {100 * summary['test_top1_error']:.2f}% "
          f"(top-5 {100 * summary['test_top5_error']:.2f}%)")
    print(f"wrote {config.out}/summary.json, checkpoint.pt, model.safetensors, metrics.jsonl"
          f"{', tb/' if config.tensorboard else ''}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from resnetlab.inference import evaluate_checkpoints

    result = evaluate_checkpoints([args.checkpoint, *args.ensemble], args.data, args.mode,
                                  batch_size=args.batch_size, workers=args.workers, precision=args.precision,
                                  calibration_data=args.calibration_data, model_name=args.model, progress=True)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    models = " + ".join(result["checkpoints"])
    print(f"{models} on {result['data']} (test split, {result['images']:,} images), {result['mode']}, "
          f"{result['precision']}: "
          f"top-1 error {100 * result['top1_error']:.2f}%, top-5 error {100 * result['top5_error']:.2f}%")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from resnetlab.inference import predict

    rankings = predict(args.checkpoint, args.images, args.top, precision=args.precision,
                       calibration_data=args.calibration_data, model_name=args.model)
    if args.json:
        print(json.dumps([{"image": path, "top": [p._asdict() for p in ranking]}
                          for path, ranking in zip(args.images, rankings)], indent=2))
        return 0
    for path, ranking in zip(args.images, rankings):
        print(path)
        for prediction in ranking:
            print(f"  {prediction.probability:8.4f}  {prediction.name}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from resnetlab.bench import bench_infer, bench_train, format_table

    batch = {} if args.batch_size is None else {"batch_size": args.batch_size}  # else each bench's own default
    if args.what == "train":
        summary = bench_train(args.model, seconds=args.seconds, **batch)
    else:
        summary = bench_infer(args.model, seconds=args.seconds, compile=args.compile, **batch)
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from resnetlab.inference import export

    path = export(args.checkpoint, args.format, args.out, precision=args.precision,
                  calibration_data=args.calibration_data)
    print(f"wrote {path} (BN folded into the convolutions, {args.precision})")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from resnetlab.experiments import reproduce

    reproduce(args.experiment, args.out, data=args.data, iterations=args.iterations, seeds=args.seeds,
              depths=args.depths, resolution=args.resolution, runs_dir=args.runs_dir, progress=not args.quiet,
              so_far=args.so_far, parallel=args.parallel, cuda_graphs=args.cuda_graphs)
    return print_report(args.out)


def cmd_report(args: argparse.Namespace) -> int:
    from resnetlab.experiments import render_report

    print(f"wrote {render_report(args.dir)} and its figures from {args.dir}/results.json")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from resnetlab.experiments import DEMO_PRESET, demo

    print(f"resnetlab demo: the degradation experiment (paper Fig. 6) on {DEMO_PRESET.data}: plain and residual "
          f"nets of {' and '.join(map(str, DEMO_PRESET.depths))} layers, {DEMO_PRESET.iterations} iterations, "
          f"{DEMO_PRESET.seeds} seeds, into {args.out}")
    demo(args.out, progress=not args.quiet)
    return print_report(args.out)


def cmd_detect_train(args: argparse.Namespace) -> int:
    from resnetlab.detection import require_detection_extra

    require_detection_extra()
    from resnetlab.detection.recipes import DETECTION_KEYS, resolve_detection_config
    from resnetlab.detection.train import resume_detection_config, train_detector

    if args.resume:
        config = resume_detection_config(args.resume)
    else:
        overrides = {key: getattr(args, key) for key in DETECTION_KEYS if hasattr(args, key)}
        config = resolve_detection_config(args.recipe, args.config, **overrides)
    summary = train_detector(config, resume=bool(args.resume), progress=not args.quiet)
    metrics = summary["metrics"]
    shown = ", ".join(f"{name} {100 * metrics[name]:.1f}" for name in ("mAP", "mAP@.5", "mAP_07", "mAP_area")
                      if name in metrics)
    print(f"{summary['model']} Faster R-CNN on {summary['dataset']}: {summary['iterations']} iterations in "
          f"{summary['wall_seconds']:.0f} s, BN {summary['batch_norm']}; {summary['eval_split']}: {shown}")
    print(f"wrote {config.out}/summary.json, checkpoint.pt, metrics.jsonl")
    return 0


def cmd_detect_evaluate(args: argparse.Namespace) -> int:
    import json

    from resnetlab.detection import require_detection_extra

    require_detection_extra()
    from resnetlab.detection.inference import evaluate_detector

    result = evaluate_detector(args.checkpoint, args.data, args.split, device=args.device)
    summary = result.pop("summary", None)
    if args.json:
        print(json.dumps(result, indent=2))
    elif summary is not None:
        print(f"{result['checkpoint']} on {result['data']} ({result['split']}, {result['images']:,} images), "
              f"COCOeval:\n{summary}", end="")
    else:
        for name, ap in result["per_class"].items():
            print(f"  {name:<12} AP07 {100 * ap['ap_07']:5.1f}  AP {100 * ap['ap_area']:5.1f}")
        print(f"{result['checkpoint']} on {result['data']} ({result['split']}, {result['images']:,} images): "
              f"mAP (VOC07 11-point) {100 * result['mAP_07']:.1f}, mAP (area) {100 * result['mAP_area']:.1f}")
    return 0


def cmd_detect_predict(args: argparse.Namespace) -> int:
    import json

    from resnetlab.detection import require_detection_extra

    require_detection_extra()
    from resnetlab.detection.inference import predict_detections

    results = predict_detections(args.checkpoint, args.images, score_threshold=args.score_threshold,
                                 out_dir=args.out, device=args.device)
    print(json.dumps(results, indent=2))
    return 0


def print_report(out: str) -> int:
    from resnetlab.report import REPORT_NAME

    report = f"{out}/{REPORT_NAME}"
    with open(report) as file:
        print("\n" + file.read())
    print(f"report: {report} (figures and results.json beside it)")
    return 0


def add_calibration_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration-data", metavar="SPEC", help="--precision int8: the dataset whose training images "
                   "calibrate the quantization (default: the one the checkpoint was trained on)")


def add_foreign_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME", help="the model that a weights file from another project holds, e.g. "
                   "resnet20 for akamaster/pytorch_resnet_cifar10's resnet20.th")


# The sections of a training command's --help, in this order.
DATA, MODEL, OPTIMIZER, COMPUTE, LOGGING = ("data", "model and weights", "optimizer and schedule", "compute",
                                            "logging and checkpoints")


def argument_groups(p: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    return {title: p.add_argument_group(title) for title in (DATA, MODEL, OPTIMIZER, COMPUTE, LOGGING)}


def add_run_arguments(groups: dict[str, argparse._ArgumentGroup], *, model: str, data: str, recipe: str,
                      evaluated: str, logged: str) -> None:
    """The flags every training command has: what to train, on what, where, from which settings, and what it
    writes when."""
    groups[MODEL].add_argument("--model", help=model)
    groups[DATA].add_argument("--data", help=data)
    groups[OPTIMIZER].add_argument("--recipe", help=recipe)
    groups[OPTIMIZER].add_argument("--config", metavar="FILE.toml", help="settings from a TOML file; flags override it")
    groups[COMPUTE].add_argument("--device", help="auto (default: CUDA when present), cpu or cuda")
    g = groups[LOGGING]
    g.add_argument("--out", help="the run directory (created)")
    g.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its checkpoint")
    g.add_argument("--checkpoint-every", type=int, metavar="K",
                   help="write checkpoint.pt every K iterations as well as at the end (default 0: at the end only)")
    g.add_argument("--eval-every", type=int, metavar="K",
                   help=f"measure {evaluated} every K iterations as well as at the end (default 0: at the end only)")
    g.add_argument("--log-every", type=int, metavar="K",
                   help=f"a line of metrics.jsonl ({logged}) every K iterations (default 10)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of a training run; None means "not given", so presets and TOML files keep their values."""
    groups = argument_groups(p)
    add_run_arguments(groups, model="a name from `resnetlab models`, e.g. resnet20",
                      data="cifar10:PATH, cifar100:PATH, mnist:PATH, folder:PATH or digits",
                      recipe="preset: cifar (default) or imagenet", evaluated="the validation and test error",
                      logged="loss, error, lr, images/s")
    g = groups[DATA]
    g.add_argument("--val-size", type=int, help="training images held out for validation (paper CIFAR: 5000)")
    g.add_argument("--padding", type=int, metavar="PIXELS",
                   help="array images are padded by this much before the random crop (at 32x32; paper: 4)")
    g.add_argument("--resolution", type=float, metavar="FACTOR",
                   help="image folders: every image size of the ImageNet recipe times FACTOR (0.5: 112x112 crops of "
                   "images resized to [128, 240], tested on 112 of 128; default 1: the paper's 224 of [256, 480])")
    g.add_argument("--per-channel-std", action=argparse.BooleanOptionalAction, default=None,
                   help="also divide by each channel's std (unit-variance input, as ImageNet weights expect)")
    g.add_argument("--workers", type=int, help="DataLoader processes for image folders")
    g.add_argument("--download", action="store_true", default=None, help="fetch CIFAR/MNIST if missing")

    g = groups[MODEL]
    g.add_argument("--shortcut", choices=["A", "B", "C"], help="residual shortcut option (paper Sec. 3.3)")
    g.add_argument("--init", metavar="PATH", help="start from these weights: a run directory, its checkpoint.pt or "
                   "model.safetensors, or a torchvision/timm state_dict (.pth); an fc for another number of classes "
                   "is re-initialised")
    g.add_argument("--freeze-backbone", action="store_true", default=None,
                   help="with --init: train the classifier (fc) alone, BN statistics kept as loaded")

    g = groups[OPTIMIZER]
    g.add_argument("--iterations", type=int,
                   help="total iterations; the lr milestones scale with it unless --lr-milestones is given")
    g.add_argument("--batch-size", type=int, help="images per SGD step, over all processes (cifar: 128, imagenet: 256)")
    g.add_argument("--lr", type=float, help="the learning rate SGD starts from (paper: 0.1)")
    g.add_argument("--lr-milestones", type=int_tuple, metavar="I1,I2,...",
                   help="iterations at which the lr is multiplied by --lr-decay (cifar: 32000,48000; '' for none)")
    g.add_argument("--lr-decay", type=float, help="the lr's factor at each milestone or plateau (paper: 0.1)")
    g.add_argument("--plateau-patience", type=int, metavar="K",
                   help="decay the lr after K evaluations without a better validation error (imagenet: 3; 0: off)")
    g.add_argument("--warmup-min-depth", type=int, metavar="DEPTH",
                   help="nets this deep or deeper start at --warmup-lr (cifar: 110; 0: no warm-up)")
    g.add_argument("--warmup-lr", type=float, help="the warm-up lr (paper: 0.01)")
    g.add_argument("--warmup-until-error", type=float, metavar="FRACTION",
                   help="warm up until the training error is below this (paper: 0.8)")
    g.add_argument("--ramp-iterations", type=int, metavar="N",
                   help="the lr rises linearly to --lr over the first N iterations (not in the paper; 0: off)")
    g.add_argument("--momentum", type=float, help="SGD momentum (paper: 0.9)")
    g.add_argument("--weight-decay", type=float, help="L2 penalty on the weights, as SGD applies it (paper: 0.0001)")
    g.add_argument("--seed", type=int, help="seeds the initial weights, the batch order and the augmentation "
                   "(default 0)")

    g = groups[COMPUTE]
    # No argparse choices: recipes.validate rejects a bad precision from a flag or a TOML file with one message.
    g.add_argument("--precision", help=f"{' or '.join(PRECISIONS)} (default fp32): bf16 autocasts the convs and the fc")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="keep activations in the NHWC memory layout, which the fast convolution kernels take "
                   "(default: on)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    g.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                   help="CUDA only: replay each training step's forward and backward as CUDA graphs (fp32, one GPU)")
    g.add_argument("--sync-bn", action="store_true", default=None, help="distributed: BN statistics over all processes")
    g.add_argument("--activation-checkpointing", action="store_true", default=None,
                   help="keep fewer activations, recompute them in backward: much less memory for about one more "
                   "forward per step (docs/benchmarks.md, section 3)")
    g.add_argument("--eval-batch-size", type=int, help="images per forward pass when evaluating (default 500)")

    g = groups[LOGGING]
    g.add_argument("--train-eval-size", type=int, metavar="N",
                   help="the final training error is measured on at most N training images (default 10000)")
    g.add_argument("--test-eval-size", type=int, metavar="N", help="evaluate at most N held-out images (validation "
                   "and test; evenly spaced over an image folder's classes); default: all")
    g.add_argument("--tensorboard", action="store_true", default=None,
                   help="also write the metrics as TensorBoard scalars under OUT/tb (pip install tensorboard)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser without its prefix matching, which took `detect train --backbone resnet18` for
    --backbone-weights: a flag is taken only as spelled, anything else is an error that names it. Subcommands'
    parsers are of this class too (argparse makes them of their parent's class)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from resnetlab.experiments import EXPERIMENTS  # the reproduce choices; imports little beyond what torch brings

    parser = ArgumentParser(prog="resnetlab", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="table of every named model: params and MACs beside the paper's figures")
    p.add_argument("--stride-in-1x1", action="store_true",
                   help="bottleneck stride on the first 1x1 as in the paper (default: on the 3x3, as torchvision)")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("train", help="train a model with one of the paper's recipes")
    add_train_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="top-1/top-5 test error of a checkpoint (or an ensemble) in a testing mode")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint.pt or the run directory holding it, or with "
                   "--model another project's weights file")
    add_foreign_model_argument(p)
    p.add_argument("--data", help="dataset spec (default: the one the checkpoint was trained on); its test split")
    p.add_argument("--mode", default="center",
                   help="center (default), 10crop (corners + center and flips; for data mirrored in training) or "
                   "multiscale (paper Sec. 3.4; for nets trained on image folders or on images larger than 64x64)")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="CKPT", help="more checkpoints; scores are averaged")
    p.add_argument("--batch-size", type=int, default=500, help="views per forward pass (10crop: 1/10 as many images)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes for image folders")
    p.add_argument("--precision", default="fp32", choices=INFERENCE_PRECISIONS,
                   help="fp32 (default: the model as trained), bf16, int8 (CPU, ONNX Runtime) or auto")
    add_calibration_argument(p)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="the most probable classes of image files")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint.pt or the run directory holding it, or with "
                   "--model another project's weights file")
    add_foreign_model_argument(p)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files Pillow can read")
    p.add_argument("--top", type=int, default=5, metavar="K", help="classes shown per image (default 5)")
    p.add_argument("--precision", default="auto", choices=INFERENCE_PRECISIONS,
                   help="auto (default): bf16 where the CPU has AMX, else fp32; int8: quantized (CPU, ONNX Runtime)")
    add_calibration_argument(p)
    p.add_argument("--json", action="store_true", help="print the predictions as JSON: each class's name (from the "
                   "training folder's synsets.txt, if it had one), probability and label (its folder's name)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("detect", help="Faster R-CNN object detection on a ResNet or VGG-16 backbone (paper Sec. 4.3; "
                       "needs pip install -e '.[detection]')")
    add_detect_commands(p.add_subparsers(dest="detect_command", required=True, metavar="ACTION"))

    p = sub.add_parser("bench", help="images/s of the default training or inference path beside a reference")
    p.add_argument("what", choices=["train", "infer"], help="train: SGD steps; infer: forward passes")
    p.add_argument("--model", required=True, help="a name from `resnetlab models`")
    p.add_argument("--batch-size", type=int, help="default: 128 for train, 16 for infer")
    p.add_argument("--seconds", type=float, default=30.0, help="time per path (split over 3 rounds)")
    p.add_argument("--compile", action="store_true", help="infer: torch.compile the fast path")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("export", help="a checkpoint's model with BN folded, as ONNX or TorchScript")
    p.add_argument("checkpoint", metavar="CKPT", help="a checkpoint.pt or the run directory holding it")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"], help="the file format written")
    p.add_argument("--out", metavar="FILE",
                   help="default: model.onnx / model.int8.onnx / model.torchscript.pt beside the checkpoint")
    p.add_argument("--precision", default="fp32", choices=EXPORT_PRECISIONS, help="int8: quantized, ONNX only")
    add_calibration_argument(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("reproduce", help="one of the paper's experiments: train its runs, write report.md and plots")
    p.add_argument("experiment", choices=list(EXPERIMENTS), help="the paper's table or figure to reproduce")
    p.add_argument("--out", required=True, metavar="DIR", help="results.json, report.md, *.png and runs/ go here")
    p.add_argument("--data", help="dataset spec (default: the experiment's own; jpeg-cost takes the forms of one "
                   "dataset, comma-separated, the reference first)")
    p.add_argument("--iterations", type=int, help="iterations of every run (the lr milestones scale with it)")
    p.add_argument("--seeds", type=int, help="seeds per network (0..K-1); errors are reported as mean and std")
    p.add_argument("--depths", type=int_tuple, metavar="D1,D2,...",
                   help="depths of the networks (e.g. 20,32,44,56,110,1202 for depth)")
    p.add_argument("--resolution", type=float, metavar="FACTOR", help="image folders: every image size of the "
                   "ImageNet recipe times FACTOR (see `train --resolution`; table2 and table3 default to 0.5)")
    p.add_argument("--runs-dir", metavar="DIR", help="where runs are trained (default OUT/runs); point it at another "
                   "experiment's runs to reuse its trained networks")
    p.add_argument("--so-far", action="store_true", help="train nothing: report the runs as they stand, each "
                   "taken at the furthest iteration all of them have reached; runs not started are named, left out")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="train up to N runs at once, each in its own process: for a GPU, which one small CIFAR net "
                   "leaves mostly idle (start CUDA MPS first for the most throughput); on a small CPU they only "
                   "share the cores")
    p.add_argument("--cuda-graphs", action="store_true", help="replay each run's training step as CUDA graphs "
                   "(one CUDA device; see `train --cuda-graphs`)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="re-render DIR/report.md and its plots from DIR/results.json")
    p.add_argument("dir", metavar="DIR", help="an experiment's output directory (reproduce --out)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the degradation problem and its cure on the embedded digits data (~10 min on 2 "
                       "CPU cores)")
    p.add_argument("--out", default="resnetlab-demo", metavar="DIR", help="default: ./resnetlab-demo")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_demo)
    return parser


def add_detect_commands(sub) -> None:
    p = sub.add_parser("train", help="train a detector (the recipe's settings, overridden by --config and flags)")
    groups = argument_groups(p)
    add_run_arguments(groups, model="backbone: a name from `resnetlab models` (e.g. resnet101, plain34) or vgg16",
                      data="coco:PATH (annotations/instances_<split>.json + <split>/) or voc:PATH (VOCdevkit/VOC2007)",
                      recipe="preset: voc (default), coco (the paper's) or small (CPU checks)",
                      evaluated="mAP on the evaluation split", logged="the losses, lr, images/s")
    g = groups[DATA]
    g.add_argument("--train-split", help="default: train2017 (COCO), trainval (VOC)")
    g.add_argument("--eval-split", help="default: val2017 (COCO), test (VOC)")
    g.add_argument("--min-size", type=int, help="shorter image side, pixels (paper: 600)")
    g.add_argument("--max-size", type=int, help="longest image side, pixels (paper: 1000)")
    g.add_argument("--workers", type=int, help="DataLoader processes decoding images")
    groups[MODEL].add_argument("--backbone-weights", metavar="PATH", help="a resnetlab run directory or checkpoint, "
                               "or a torchvision-format state_dict (.pth or .safetensors); BN is then frozen. "
                               "Default: from scratch, BN trained")
    g = groups[OPTIMIZER]
    g.add_argument("--iterations", type=int, help="total iterations; the lr milestones scale with it")
    g.add_argument("--images-per-batch", type=int, help="images per SGD step (voc: 1, coco: 8)")
    g.add_argument("--lr", type=float, help="the learning rate SGD starts from (paper: 0.001)")
    g.add_argument("--seed", type=int, help="seeds the initial weights, the image order and the flips (default 0)")
    p.set_defaults(func=cmd_detect_train)

    p = sub.add_parser("evaluate", help="COCO mAP (pycocotools) or VOC AP per class of a trained detector")
    p.add_argument("checkpoint", metavar="CKPT", help="a detection checkpoint.pt or the run directory holding it")
    p.add_argument("--data", help="coco:PATH or voc:PATH (default: the one it was trained on)")
    p.add_argument("--split", help="default: the run's evaluation split")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when present), cpu or cuda")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_detect_evaluate)

    p = sub.add_parser("predict", help="detections in image files: JSON, and the images with the boxes drawn")
    p.add_argument("checkpoint", metavar="CKPT", help="a detection checkpoint.pt or the run directory holding it")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files Pillow can read")
    p.add_argument("--score-threshold", type=float, default=0.5, help="smallest score shown (default 0.5)")
    p.add_argument("--out", default="detections", metavar="DIR",
                   help="where IMAGE.detections.png are written (default ./detections)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA when present), cpu or cuda")
    p.set_defaults(func=cmd_detect_predict)


def int_tuple(text: str) -> tuple[int, ...]:
    """Comma-separated integers; '' is the empty tuple."""
    return tuple(int(part) for part in text.split(",")) if text else ()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside a training loop, or a second one inside it
        print(f"resnetlab {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except RunStopped as stopped:  # a training loop saved its state and stopped on a signal: not a failure
        print(f"resnetlab {args.command}: {stopped}", file=sys.stderr)
        return 128 + stopped.signal_number
    except (ValueError, FileNotFoundError, PermissionError, ResnetlabError) as error:  # messages that say what to do
        message = str(error)
    except RuntimeError as error:
        message = machine_failure(error, args)
        if message is None:
            raise  # a bug: its traceback is what a report of it needs
    print(f"resnetlab {args.command}: error: {message}", file=sys.stderr)
    return 2


# Flags that make a command need less memory, and how the out-of-memory hint names them.
MEMORY_SAVERS = (("batch_size", "a smaller --batch-size"), ("activation_checkpointing", "--activation-checkpointing"),
                 ("precision", "--precision bf16 on a GPU"))


def machine_failure(error: RuntimeError, args: argparse.Namespace) -> str | None:
    """One line for a RuntimeError that is the machine's doing rather than a bug, or None. Out of memory: torch's
    message goes on with allocator statistics, so this keeps the size and names this command's flags that need less
    memory. A DataLoader worker that died or timed out: torch's message is already one line."""
    import torch

    text = str(error)
    if text.startswith("DataLoader "):
        return text
    if not isinstance(error, torch.OutOfMemoryError) and "DefaultCPUAllocator: can't allocate memory" not in text:
        return None
    size = re.search(r"[Tt]ried to allocate (\d+(?:\.\d+)? \w+)", text)
    where = "the GPU" if isinstance(error, torch.OutOfMemoryError) else "the CPU"
    savers = [saver for key, saver in MEMORY_SAVERS if hasattr(args, key)]
    hint = " or ".join([", ".join(savers[:-1]), savers[-1]] if len(savers) > 1 else savers)
    return f"out of memory on {where}" + (f" (tried to allocate {size[1]})" if size else "") + (
        f"; try {hint}" if hint else "")
