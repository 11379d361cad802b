"""Training of a Faster R-CNN detector, in the style of resnetlab.train (its evaluation and prediction:
`detection.inference`).

    resnetlab detect train --model resnet101 --data voc:VOCdevkit/VOC2007 --backbone-weights resnet101.pth --out runs/d

writes into OUT: metrics.jsonl (losses every log_every iterations, the evaluation's metrics when it runs),
checkpoint.pt (atomically, every checkpoint_every iterations and at the end) and summary.json at the end.
Training is torchvision's approximate joint training of the RPN and the detector (one loss, one backward),
not the 4-step alternating training the paper used.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from resnetlab.checkpoint import checkpoint_path, restore_weights, save_checkpoint
from resnetlab.detection.data import (
    DEFAULT_SPLITS,
    DetectionData,
    load_detection_data,
    parse_detection_spec,
    training_batches,
)
from resnetlab.detection.inference import TASK, evaluate_split, load_detection_checkpoint
from resnetlab.detection.model import IMAGENET_MEAN, IMAGENET_STD, build_detector, pretrained_classifier
from resnetlab.detection.recipes import DetectionConfig, validate_detection
from resnetlab.files import write_json_atomically
from resnetlab.precision import pick_device
from resnetlab.progress import Progress
from resnetlab.runlog import (
    MetricsLog,
    NonFiniteLossError,
    StopOnSignal,
    check_finite_weights,
    ensure_writable,
    last_good_state,
)
from resnetlab.schedule import LrSchedule

# The recipe fields that shape the network (the rest only shape training); stored so evaluate/predict rebuild it.
DETECTOR_FIELDS = ("min_size", "max_size", "anchor_sizes", "aspect_ratios", "roi_pool_size", "rpn_pre_nms_train",
                   "rpn_post_nms_train", "rpn_pre_nms_test", "rpn_post_nms_test", "rpn_batch_size",
                   "rois_per_image", "box_nms_threshold", "detections_per_image")


@dataclass
class DetectionRun:
    config: DetectionConfig
    data: DetectionData
    model: torch.nn.Module
    model_kwargs: dict
    optimizer: torch.optim.Optimizer
    schedule: LrSchedule
    device: torch.device
    start: int = 0
    elapsed: float = 0.0


def detector_kwargs(config: DetectionConfig, num_classes: int, frozen_bn: bool, backbone_kwargs: dict, mean,
                    std) -> dict:
    """build_detector's arguments, stored in checkpoints: evaluate, predict and --resume rebuild the detector from
    them, its backbone with the classifier's own settings (a shortcut-B resnet20 is not the default one)."""
    recipe = asdict(config.recipe)
    return {"backbone": config.model, "backbone_kwargs": backbone_kwargs, "num_classes": num_classes,
            "frozen_bn": frozen_bn, "image_mean": list(mean), "image_std": list(std),
            **{key: recipe[key] for key in DETECTOR_FIELDS}}


def train_detector(config: DetectionConfig, *, resume: bool = False, progress: bool = True) -> dict:
    """Train as `config` says; with `resume`, continue from the checkpoint in config.out. Returns the summary."""
    run = prepare(config, resume)
    out, recipe = Path(config.out), config.recipe
    bar = Progress(recipe.iterations, f"{config.model} detector", start=run.start, enabled=progress)
    window: dict[str, float] = {}
    batches_in_window = 0
    session_start = time.perf_counter()
    metrics = MetricsLog(out, run.start, tensorboard=False)
    if config.eval_every and run.start == 0:  # where the curve starts: an untrained detector's metrics
        metrics.write({"iteration": 0, **evaluation_record(run)})
    window_start = time.perf_counter()
    stopping = False  # a signal asked the run to stop (StopOnSignal) before its last iteration
    run.model.train()
    batches = training_batches(run.data.train, batch_size=recipe.images_per_batch, seed=config.seed,
                               start=run.start, stop=recipe.iterations, flip=recipe.flip, workers=config.workers)
    with StopOnSignal() as stop:
        for iteration, (images, targets) in enumerate(batches, start=run.start):
            lr = run.schedule.lr(iteration)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            losses = run.model([image.to(run.device).float().div_(255) for image in images],
                               [{key: value.to(run.device) for key, value in target.items()} for target in targets])
            loss = sum(losses.values())
            if not math.isfinite(loss.item()):
                raise NonFiniteLossError(f"the training loss became {loss.item()} at iteration {iteration + 1} "
                                         f"(lr {lr:g}); stopped. {last_good_state(out)}")
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            run.optimizer.step()
            for name, value in {"loss": loss, **losses}.items():
                window[name] = window.get(name, 0.0) + value.item()
            batches_in_window += 1

            done = iteration + 1
            evaluate_now = done == recipe.iterations or (config.eval_every and done % config.eval_every == 0)
            if done % config.log_every == 0 or evaluate_now:
                seconds = time.perf_counter() - window_start
                record = {"iteration": done, "lr": lr,
                          **{name: total / batches_in_window for name, total in window.items()},
                          "images_per_second": batches_in_window * recipe.images_per_batch / seconds}
                if evaluate_now:
                    record.update(evaluation_record(run))
                    run.model.train()
                metrics.write(record)
                window, batches_in_window = {}, 0
                window_start = time.perf_counter()
            stopping = stop.signal_number is not None and done < recipe.iterations
            if (done == recipe.iterations or stopping
                    or (config.checkpoint_every and done % config.checkpoint_every == 0)):
                check_finite_weights(run.model, done, out)
                save_detection_state(run, done, run.elapsed + time.perf_counter() - session_start)
            bar.update(done, loss=f"{loss.item():.3f}")
            if stopping:
                break
    bar.close()
    if stopping:
        raise stop.stopped(done, recipe.iterations, out, "resnetlab detect train --resume")
    return finish(run, run.elapsed + time.perf_counter() - session_start)


def prepare(config: DetectionConfig, resume: bool) -> DetectionRun:
    validate_detection(config)
    out = Path(config.out)
    state = load_detection_checkpoint(out) if resume else None
    ensure_writable(out)
    device = pick_device(config.device)
    kind, _ = parse_detection_spec(config.data)
    train_split = config.train_split or DEFAULT_SPLITS[kind][0]
    eval_split = config.eval_split or DEFAULT_SPLITS[kind][1]
    data = load_detection_data(config.data, train_split, eval_split)
    torch.manual_seed(config.seed)
    # From scratch: the default network, its inputs scaled as torchvision's are.
    classifier, backbone_kwargs, mean, std = None, {}, IMAGENET_MEAN, IMAGENET_STD
    if config.backbone_weights is not None and state is None:
        classifier, backbone_kwargs, mean, std = pretrained_classifier(config.model, config.backbone_weights)
    model_kwargs = (state["model_kwargs"] if state is not None else
                    detector_kwargs(config, len(data.classes) + 1, config.backbone_weights is not None,
                                    backbone_kwargs, mean, std))
    model = build_detector(**model_kwargs, classifier=classifier)
    if state is not None:
        restore_weights(model, state, checkpoint_path(out))
    model = model.to(device)
    recipe = config.recipe
    optimizer = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                                weight_decay=recipe.weight_decay)
    run = DetectionRun(config, data, model, model_kwargs, optimizer, LrSchedule(recipe, warm_up=False), device)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        run.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"]["torch"])
        run.start, run.elapsed = state["iteration"], state["elapsed_seconds"]
    return run


def bn_mode(model_kwargs: dict) -> str:
    return ("frozen (constant scale and shift from the classifier)" if model_kwargs["frozen_bn"]
            else "trained (from scratch)")


def save_detection_state(run: DetectionRun, iteration: int, elapsed: float) -> None:
    save_checkpoint({
        "task": TASK, "model_name": run.config.model, "model_kwargs": run.model_kwargs, "classes": run.data.classes,
        "category_ids": run.data.category_ids, "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "schedule": run.schedule.state_dict(), "iteration": iteration,
        "elapsed_seconds": elapsed, "rng": {"torch": torch.get_rng_state()}, "config": run.config.to_dict(),
        "data_note": run.data.note,
    }, checkpoint_path(run.config.out))


def finish(run: DetectionRun, wall_seconds: float) -> dict:
    config = run.config
    metrics = read_last_metrics(Path(config.out) / "metrics.jsonl")
    summary = {
        "model": config.model, "dataset": config.data, "data_note": run.data.note,
        "batch_norm": bn_mode(run.model_kwargs), "backbone_weights": config.backbone_weights,
        "iterations": config.recipe.iterations, "eval_split": run.data.eval.name, "metrics": metrics,
        "wall_seconds": wall_seconds, "device": str(run.device), "torch": torch.__version__,
        "config": config.to_dict(),
    }
    write_json_atomically(Path(config.out) / "summary.json", summary)
    return summary


def read_last_metrics(path: Path) -> dict:
    import json

    last = json.loads(path.read_text().splitlines()[-1])
    return {key: value for key, value in last.items() if key.startswith(("mAP", "AR", "per_class"))}


def evaluation_record(run: DetectionRun) -> dict:
    """The metrics of the evaluation split, as metrics.jsonl keeps them (COCOeval's printed table left out)."""
    metrics = evaluate_split(run.model, run.data, run.data.eval, run.device)
    return {key: value for key, value in metrics.items() if key != "summary"}


def resume_detection_config(out: str | Path) -> DetectionConfig:
    """The configuration a detection run directory was started with, read from its checkpoint."""
    state = load_detection_checkpoint(out)
    return DetectionConfig.from_dict({**state["config"], "out": str(out)})
