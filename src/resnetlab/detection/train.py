"""Training, evaluation and prediction of a Faster R-CNN detector, in the style of resnetlab.train.

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
from PIL import Image, ImageDraw

from resnetlab.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, restore_weights, save_checkpoint
from resnetlab.detection.data import (
    DEFAULT_SPLITS,
    DetectionData,
    DetectionSplit,
    load_detection_data,
    load_image,
    parse_detection_spec,
    training_batches,
    voc_box,
)
from resnetlab.detection.metrics import coco_metrics, voc_metrics
from resnetlab.detection.model import IMAGENET_MEAN, IMAGENET_STD, build_detector, pretrained_classifier
from resnetlab.detection.recipes import DetectionConfig, validate_detection
from resnetlab.files import write_json_atomically
from resnetlab.precision import pick_device
from resnetlab.progress import Progress
from resnetlab.train import (
    LrSchedule,
    MetricsLog,
    NonFiniteLossError,
    check_finite_weights,
    ensure_writable,
    last_good_state,
)

TASK = "detection"  # marks a detection checkpoint apart from a classification one
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
    run.model.train()
    batches = training_batches(run.data.train, batch_size=recipe.images_per_batch, seed=config.seed,
                               start=run.start, stop=recipe.iterations, flip=recipe.flip, workers=config.workers)
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
        if done == recipe.iterations or (config.checkpoint_every and done % config.checkpoint_every == 0):
            check_finite_weights(run.model, done, out)
            save_detection_state(run, done, run.elapsed + time.perf_counter() - session_start)
        bar.update(done, loss=f"{loss.item():.3f}")
    bar.close()
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


# --------------------------------------------------------------------------------------------------------------
# Checkpoints, evaluation and prediction
# --------------------------------------------------------------------------------------------------------------


def load_detection_checkpoint(path: str | Path) -> dict:
    state = load_checkpoint(path)
    if state.get("task") != TASK:
        raise CheckpointError(f"{checkpoint_path(path)} is a classification checkpoint, not a detector's "
                              "(use resnetlab evaluate / predict for it)")
    return state


def load_detector(path: str | Path, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The detector a checkpoint holds, in eval mode, and the checkpoint."""
    state = load_detection_checkpoint(path)
    model = build_detector(**state["model_kwargs"])
    restore_weights(model, state, checkpoint_path(path))
    return model.to(device).eval(), state


@torch.no_grad()
def detect(model: torch.nn.Module, split: DetectionSplit, device: torch.device, batch_size: int = 2
           ) -> list[dict[str, torch.Tensor]]:
    """The detector's output for every image of `split`, in order (boxes in the image's own pixels)."""
    model.eval()
    outputs = []
    for first in range(0, len(split), batch_size):
        records = split.records[first:first + batch_size]
        images = [load_image(record).to(device).float().div_(255) for record in records]
        outputs += [{key: value.cpu() for key, value in output.items()} for output in model(images)]
    return outputs


def evaluate_split(model: torch.nn.Module, data: DetectionData, split: DetectionSplit, device: torch.device) -> dict:
    return score_detections(data, split, detect(model, split, device))


def score_detections(data: DetectionData, split: DetectionSplit, outputs: list[dict[str, torch.Tensor]]) -> dict:
    """COCO's metrics (pycocotools) on a COCO split; VOC's 11-point and area AP on a VOC split. `outputs` are the
    detector's, one per image of `split` (xyxy boxes in pixels, labels 1..K, scores)."""
    if data.kind == "coco":
        results = [{"image_id": record.image_id, "category_id": data.category_ids[label - 1],
                    "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
                   for record, output in zip(split.records, outputs)
                   for (x1, y1, x2, y2), label, score in zip(output["boxes"].tolist(), output["labels"].tolist(),
                                                             output["scores"].tolist())]
        return coco_metrics(split.annotation_file, results, [record.image_id for record in split.records])
    detections = [(record.image_id, label, score, box)
                  for record, output in zip(split.records, outputs)
                  for box, label, score in zip(voc_box(output["boxes"]), output["labels"].tolist(),
                                               output["scores"].tolist())]
    truth = {record.image_id: (voc_box(record.boxes), record.labels.numpy(), record.ignored.numpy())
             for record in split.records}
    return voc_metrics(detections, truth, data.classes)


def evaluation_record(run: DetectionRun) -> dict:
    """The metrics of the evaluation split, as metrics.jsonl keeps them (COCOeval's printed table left out)."""
    metrics = evaluate_split(run.model, run.data, run.data.eval, run.device)
    return {key: value for key, value in metrics.items() if key != "summary"}


def evaluate_detector(checkpoint: str | Path, data: str | None = None, split: str | None = None, *,
                      device: str = "auto") -> dict:
    """A trained detector's metrics on a split (default: the data and evaluation split it was trained with)."""
    target = pick_device(device)
    model, state = load_detector(checkpoint, target)
    trained = state["config"]
    data = data or trained["data"]
    kind, _ = parse_detection_spec(data)
    split = split or (trained["eval_split"] if data == trained["data"] else None) or DEFAULT_SPLITS[kind][1]
    loaded = load_detection_data(data, None, split)
    if loaded.classes != state["classes"]:
        raise ValueError(f"{data} has classes {loaded.classes[:3]}... ({len(loaded.classes)}), but "
                         f"{checkpoint_path(checkpoint)} detects {state['classes'][:3]}... ({len(state['classes'])})")
    metrics = evaluate_split(model, loaded, loaded.eval, target)
    return {"checkpoint": str(checkpoint_path(checkpoint)), "data": data, "split": split, "images": len(loaded.eval),
            "note": loaded.note, **metrics}


@torch.no_grad()
def predict_detections(checkpoint: str | Path, image_paths: list[str | Path], *, score_threshold: float = 0.5,
                       out_dir: str | Path | None = None, device: str = "auto") -> list[dict]:
    """Each image's detections scoring at least `score_threshold` (class name, score, box x1 y1 x2 y2 in pixels),
    and, when `out_dir` is given, a copy of the image with them drawn, written there as NAME.detections.png."""
    from resnetlab.detection.data import ImageRecord

    target = pick_device(device)
    model, state = load_detector(checkpoint, target)
    results = []
    for path in map(Path, image_paths):
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        with Image.open(path) as img:
            width, height = img.size
        record = ImageRecord(path, path.stem, width, height, torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64),
                             torch.zeros(0, dtype=torch.bool))
        output = model([load_image(record).to(target).float().div_(255)])[0]
        keep = output["scores"] >= score_threshold
        detections = [{"class": state["classes"][label - 1], "score": round(score, 4),
                       "box": [round(v, 1) for v in box]}
                      for box, label, score in zip(output["boxes"][keep].tolist(), output["labels"][keep].tolist(),
                                                   output["scores"][keep].tolist())]
        result = {"image": str(path), "detections": detections}
        if out_dir is not None:
            result["drawn"] = str(draw_detections(path, detections, Path(out_dir)))
        results.append(result)
    return results


def draw_detections(path: Path, detections: list[dict], out_dir: Path) -> Path:
    """The image with each detection's box, class name and score drawn on it, as a PNG in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with Image.open(path) as img:
        canvas = img.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    line = max(2, round(max(canvas.size) / 300))
    for index, detection in enumerate(detections):
        colour = PALETTE[index % len(PALETTE)]
        x1, y1, x2, y2 = detection["box"]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=line)
        label = f"{detection['class']} {detection['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), label)
        height = bottom - top + 2 * line
        label_top = y1 - height if y1 >= height else y1  # inside the box when there is no room above it
        draw.rectangle((x1, label_top, x1 + right - left + 2 * line, label_top + height), fill=colour)
        draw.text((x1 + line, label_top + line), label, fill=(0, 0, 0))
    written = out_dir / f"{path.stem}.detections.png"
    canvas.save(written)
    return written


PALETTE = [(255, 99, 71), (60, 179, 113), (65, 105, 225), (255, 215, 0), (238, 130, 238), (0, 206, 209),
           (255, 165, 0), (154, 205, 50)]


def resume_detection_config(out: str | Path) -> DetectionConfig:
    """The configuration a detection run directory was started with, read from its checkpoint."""
    state = load_detection_checkpoint(out)
    return DetectionConfig.from_dict({**state["config"], "out": str(out)})
