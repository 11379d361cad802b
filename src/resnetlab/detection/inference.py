"""A trained detector at work: its checkpoint read back, its detections on a split scored (COCO or VOC metrics), and
its detections in image files drawn.

    resnetlab detect evaluate runs/d
    resnetlab detect predict runs/d photo.jpg --out detections/
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from resnetlab.checkpoint import CheckpointError, checkpoint_path, load_checkpoint, restore_weights
from resnetlab.detection.data import (
    DEFAULT_SPLITS,
    DetectionData,
    DetectionSplit,
    load_detection_data,
    load_image,
    parse_detection_spec,
    voc_box,
)
from resnetlab.detection.metrics import coco_metrics, voc_metrics
from resnetlab.detection.model import build_detector
from resnetlab.precision import pick_device

TASK = "detection"  # marks a detection checkpoint apart from a classification one


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
