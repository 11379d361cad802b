"""resnetlab.detection.metrics: VOC AP against cases computed by hand, the COCO wrapper against COCOeval run
directly on the same detections (the real COCO128 annotations), and the detections' conversion to both."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest
import torch
from test_detection_data import COCO128_DIR, COCO128_JSON, needs_coco128, needs_extra

from resnetlab.detection.metrics import inclusive_iou, voc_ap, voc_class_ap, voc_metrics


def test_voc_ap_of_a_hand_computed_curve():
    recall = np.array([0.5, 0.5, 1.0])
    precision = np.array([1.0, 0.5, 2 / 3])
    # 11-point: precision 1 at recall 0, .1, ... .5 (6 points), then 2/3 at .6 ... 1 (5 points)
    assert voc_ap(recall, precision, use_07_metric=True) == pytest.approx((6 * 1 + 5 * 2 / 3) / 11, abs=1e-12)
    # area under the envelope: recall 0 -> .5 at precision 1, .5 -> 1 at 2/3
    assert voc_ap(recall, precision, use_07_metric=False) == pytest.approx(0.5 + 0.5 * 2 / 3, abs=1e-12)


def test_inclusive_iou_counts_pixels_as_voc_does():
    box = np.array([1.0, 1.0, 10.0, 10.0])  # 10 x 10 pixels
    others = np.array([[1.0, 1.0, 10.0, 10.0], [6.0, 1.0, 15.0, 10.0], [11.0, 11.0, 20.0, 20.0]])
    np.testing.assert_allclose(inclusive_iou(box, others), [1.0, 50 / 150, 0.0])


def test_difficult_objects_are_neither_true_nor_false_positives():
    boxes_a = np.array([[1.0, 1.0, 10.0, 10.0], [30.0, 30.0, 50.0, 50.0]])
    truth = {"a": (boxes_a, np.array([False, True])), "b": (np.array([[5.0, 5.0, 20.0, 20.0]]), np.array([False]))}
    detections = [
        ("a", 0.9, [1, 1, 10, 10]),  # true positive
        ("a", 0.8, [30, 30, 50, 50]),  # on the difficult object: ignored
        ("a", 0.7, [1, 1, 10, 11]),  # second detection of a matched object: false positive
        ("b", 0.6, [60, 60, 70, 70]),  # nothing there: false positive
        ("b", 0.5, [5, 5, 20, 20]),  # true positive
    ]
    # after each detection: recall .5 .5 .5 .5 1, precision 1 1 .5 1/3 .5 (two positives; the ignored one
    # changes neither count)
    assert voc_class_ap(detections, truth, use_07_metric=True) == pytest.approx((6 * 1 + 5 * 0.5) / 11, abs=1e-12)
    assert voc_class_ap(detections, truth, use_07_metric=False) == pytest.approx(0.5 + 0.5 * 0.5, abs=1e-12)


def test_an_overlap_of_exactly_one_half_is_not_a_match():
    truth = {"a": (np.array([[1.0, 1.0, 10.0, 10.0]]), np.array([False]))}
    # 10 x 10 against 10 x 10 shifted: intersection 10 * (10 - s), so IoU 1/2 needs intersection 200/3; take a
    # box whose IoU is exactly 1/2: 10 x 20 containing the object
    assert inclusive_iou(np.array([1.0, 1.0, 10.0, 20.0]), truth["a"][0])[0] == 0.5
    assert voc_class_ap([("a", 1.0, [1, 1, 10, 20])], truth, use_07_metric=False) == 0.0
    assert voc_class_ap([("a", 1.0, [1, 1, 10, 19])], truth, use_07_metric=False) == 1.0  # IoU 10/19


def test_voc_metrics_average_the_classes_that_have_objects():
    truth = {"a": (np.array([[1.0, 1.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), np.array([1, 2]),
                   np.array([False, False]))}
    detections = [("a", 1, 0.9, [1, 1, 10, 10]), ("a", 2, 0.9, [50, 50, 60, 60])]
    result = voc_metrics(detections, truth, ["cat", "dog", "cow"])
    assert result["per_class"]["cat"] == {"ap_07": pytest.approx(1.0, abs=1e-12), "ap_area": 1.0}
    assert result["per_class"]["dog"] == {"ap_07": 0.0, "ap_area": 0.0}
    assert np.isnan(result["per_class"]["cow"]["ap_07"])  # no object: left out of the mean
    assert result["mAP_07"] == pytest.approx(0.5, abs=1e-12) and result["mAP_area"] == 0.5


# --------------------------------------------------------------------------------------------------------------
# COCO, through pycocotools
# --------------------------------------------------------------------------------------------------------------


def noisy_detections(seed: int = 0) -> list[dict]:
    """Detections in COCO's results format on the COCO128 images: each object found with a jittered box and a
    random score, or missed, or labelled with a wrong category; plus random false positives."""
    import json

    content = json.loads(COCO128_JSON.read_text())
    category_ids = [c["id"] for c in content["categories"]]
    rng = np.random.default_rng(seed)
    results = []
    for annotation in content["annotations"]:
        if rng.random() < 0.2:
            continue
        x, y, w, h = annotation["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        category = annotation["category_id"] if rng.random() < 0.85 else int(rng.choice(category_ids))
        results.append({"image_id": annotation["image_id"], "category_id": category,
                        "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                        "score": float(rng.random())})
    for image in content["images"]:
        for _ in range(2):
            results.append({"image_id": image["id"], "category_id": int(rng.choice(category_ids)),
                            "bbox": [float(rng.uniform(0, image["width"] - 50)),
                                     float(rng.uniform(0, image["height"] - 50)),
                                     float(rng.uniform(5, 50)), float(rng.uniform(5, 50))],
                            "score": float(rng.random())})
    return results


@needs_extra
@needs_coco128
@pytest.mark.parametrize("seed", [0, 1])
def test_coco_metrics_are_cocoeval_s_own_on_the_same_detections(seed):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from resnetlab.detection.metrics import COCO_STAT_NAMES, coco_metrics

    detections = noisy_detections(seed)
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth = COCO(str(COCO128_JSON))
        reference = COCOeval(ground_truth, ground_truth.loadRes(detections), "bbox")
        reference.evaluate()
        reference.accumulate()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        reference.summarize()

    ours = coco_metrics(COCO128_JSON, detections, ground_truth.getImgIds())
    assert [ours[name] for name in COCO_STAT_NAMES] == reference.stats.tolist()
    assert ours["summary"] == printed.getvalue()
    printed_numbers = [float(v) for v in re.findall(r"= (-?[0-9.]+)\n", printed.getvalue())]
    assert printed_numbers == [round(ours[name], 3) for name in COCO_STAT_NAMES]
    assert 0.2 < ours["mAP@.5"] < 0.95 and ours["mAP@.75"] < ours["mAP@.5"]


@needs_extra
@needs_coco128
def test_no_detections_score_zero_where_there_are_objects():
    from resnetlab.detection.metrics import coco_metrics

    result = coco_metrics(COCO128_JSON, [], [9, 25])
    assert result["mAP"] == result["mAP@.5"] == 0.0
    assert "Average Precision" in result["summary"]


@needs_extra
@needs_coco128
def test_the_ground_truth_as_detections_scores_one_in_both_evaluations():
    """The conversions from the detector's outputs (xyxy boxes, labels 1..K) to COCO's results format and to
    VOC's pixel frame: fed the annotations themselves, both evaluations give a perfect score."""
    from resnetlab.detection.data import load_detection_data
    from resnetlab.detection.inference import score_detections

    data = load_detection_data(f"coco:{COCO128_DIR}", None, "train2017")
    outputs = [{"boxes": record.boxes[~record.ignored], "labels": record.labels[~record.ignored],
                "scores": torch.ones(int((~record.ignored).sum()))} for record in data.eval.records]
    metrics = score_detections(data, data.eval, outputs)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["mAP@.5"] == 1.0
    data.kind = "voc"  # the same boxes through the VOC evaluation
    metrics = score_detections(data, data.eval, outputs)
    assert metrics["mAP_07"] == pytest.approx(1.0, abs=1e-12) and metrics["mAP_area"] == 1.0
