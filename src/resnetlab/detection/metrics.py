"""Detection metrics as the reference tools compute them.

COCO: pycocotools' COCOeval itself runs on the detections (the JSON results format, COCO category ids), against
the annotation file as it is on disk, so crowd regions, areas and the 100-detections cap are COCO's own.

PASCAL VOC: average precision per class as the official devkit and its Python port (py-faster-rcnn's
voc_eval) compute it: detections sorted by score, a detection is a true positive when its best overlap (IoU in
VOC's inclusive pixel frame, where a box spans xmax - xmin + 1 pixels) exceeds 0.5 with a ground-truth object
not matched before; a match with a ``difficult`` object is neither a true nor a false positive, and difficult
objects do not count among the positives. ``use_07_metric`` gives VOC2007's 11-point AP, otherwise the area
under the precision envelope (VOC2010 and later).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

COCO_STAT_NAMES = ("mAP", "mAP@.5", "mAP@.75", "mAP_small", "mAP_medium", "mAP_large",
                   "AR@1", "AR@10", "AR@100", "AR_small", "AR_medium", "AR_large")
VOC_IOU_THRESHOLD = 0.5


def coco_metrics(annotation_file: str | Path, detections: list[dict], image_ids: Sequence[int]) -> dict:
    """COCOeval's 12 bbox statistics over `image_ids` (COCO's -1 where an area range has no object), and the
    table it prints, under "summary"."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # pycocotools prints timings; the summary table is kept below
        ground_truth = COCO(str(annotation_file))
        results = ground_truth.loadRes(detections) if detections else no_results(ground_truth)
        evaluation = COCOeval(ground_truth, results, "bbox")
        evaluation.params.imgIds = sorted(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        evaluation.summarize()
    return {**dict(zip(COCO_STAT_NAMES, evaluation.stats.tolist())), "summary": summary.getvalue()}


def no_results(ground_truth):
    """An empty results set (loadRes refuses an empty list): every object is then missed, which COCOeval scores."""
    from pycocotools.coco import COCO

    results = COCO()
    results.dataset = {"images": list(ground_truth.dataset["images"]),
                       "categories": list(ground_truth.dataset["categories"]), "annotations": []}
    results.createIndex()
    return results


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP from the recall and precision after each detection (ordered by decreasing score)."""
    if use_07_metric:  # the precision at recall >= 0, 0.1, ..., 1 (the best to its right), averaged
        ap = 0.0
        for threshold in np.arange(0.0, 1.1, 0.1):
            reached = recall >= threshold
            ap += (precision[reached].max() if reached.any() else 0.0) / 11.0
        return float(ap)
    recall = np.concatenate(([0.0], recall, [1.0]))
    precision = np.concatenate(([0.0], precision, [0.0]))
    precision = np.maximum.accumulate(precision[::-1])[::-1]  # the precision envelope: best to the right
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def voc_class_ap(detections: Sequence[tuple[object, float, Sequence[float]]],
                 ground_truth: dict[object, tuple[np.ndarray, np.ndarray]], *, use_07_metric: bool,
                 iou_threshold: float = VOC_IOU_THRESHOLD) -> float:
    """AP of one class. detections: (image id, score, box) with boxes in VOC's 1-based inclusive pixel frame;
    ground_truth: image id -> (boxes (M, 4) in that frame, difficult (M,) bool), for every evaluated image.
    NaN when the class has no non-difficult object."""
    positives = sum(int((~difficult).sum()) for _, difficult in ground_truth.values())
    if positives == 0:
        return float("nan")
    if not detections:
        return 0.0
    scores = np.array([score for _, score, _ in detections], dtype=np.float64)
    order = np.argsort(-scores)  # the reference's own call, so tied scores are taken in its order
    matched = {image: np.zeros(len(difficult), dtype=bool) for image, (_, difficult) in ground_truth.items()}
    true_positive = np.zeros(len(order))
    false_positive = np.zeros(len(order))
    for rank, index in enumerate(order):
        image, _, box = detections[index]
        boxes, difficult = ground_truth[image]
        overlaps = inclusive_iou(np.asarray(box, dtype=np.float64), boxes)
        best = int(overlaps.argmax()) if len(overlaps) else -1
        if best >= 0 and overlaps[best] > iou_threshold:
            if difficult[best]:
                continue
            if not matched[image][best]:
                true_positive[rank] = matched[image][best] = True
                continue
        false_positive[rank] = 1
    true_positive, false_positive = np.cumsum(true_positive), np.cumsum(false_positive)
    recall = true_positive / positives
    precision = true_positive / np.maximum(true_positive + false_positive, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric)


def inclusive_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box with each of `boxes`, counting pixels inclusively (a box x1..x2 is x2 - x1 + 1 wide)."""
    if len(boxes) == 0:
        return np.zeros(0)
    width = np.maximum(np.minimum(boxes[:, 2], box[2]) - np.maximum(boxes[:, 0], box[0]) + 1.0, 0.0)
    height = np.maximum(np.minimum(boxes[:, 3], box[3]) - np.maximum(boxes[:, 1], box[1]) + 1.0, 0.0)
    intersection = width * height
    union = ((box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
             + (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0) - intersection)
    return intersection / union


def voc_metrics(detections: Sequence[tuple[object, int, float, Sequence[float]]],
                ground_truth: dict[object, tuple[np.ndarray, np.ndarray, np.ndarray]],
                classes: Sequence[str]) -> dict:
    """Per-class AP and its mean, both VOC2007 11-point and area. detections: (image id, label 1..K, score, box);
    ground_truth: image id -> (boxes, labels, difficult), boxes in VOC's 1-based inclusive frame."""
    per_class = {}
    for label, name in enumerate(classes, start=1):
        class_detections = [(image, score, box) for image, det_label, score, box in detections if det_label == label]
        class_truth = {image: (boxes[labels == label], difficult[labels == label])
                       for image, (boxes, labels, difficult) in ground_truth.items()}
        per_class[name] = {"ap_07": voc_class_ap(class_detections, class_truth, use_07_metric=True),
                           "ap_area": voc_class_ap(class_detections, class_truth, use_07_metric=False)}
    scored = [ap for ap in per_class.values() if not np.isnan(ap["ap_07"])]
    return {"mAP_07": float(np.mean([ap["ap_07"] for ap in scored])) if scored else float("nan"),
            "mAP_area": float(np.mean([ap["ap_area"] for ap in scored])) if scored else float("nan"),
            "per_class": per_class}
