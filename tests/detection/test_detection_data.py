"""resnetlab.detection.data: the real COCO128 annotations read as COCO wrote them, VOC XML in its pixel frame,
malformed files named in their errors, and training batches that mirror boxes with their images."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from resnetlab.detection import missing_packages
from resnetlab.detection.data import (
    VOC_CLASSES,
    FlipBatchSampler,
    TrainingImages,
    load_detection_data,
    load_image,
    voc_box,
)

COCO128_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "coco128"
COCO128_JSON = COCO128_DIR / "annotations" / "instances_train2017.json"
needs_coco128 = pytest.mark.skipif(not COCO128_JSON.is_file(),
                                   reason=f"the COCO128 images are not here ({COCO128_DIR})")
needs_extra = pytest.mark.skipif(bool(missing_packages()), reason=f"detection needs {' and '.join(missing_packages())}"
                                 " (pip install -e '.[detection]'); .ci/run runs these tests in a second environment")


def coco_subset(root: Path, count: int, edit=None) -> Path:
    """A COCO-layout copy of the first `count` COCO128 images with boxes (images linked, not copied), its JSON
    optionally changed by `edit` first."""
    content = json.loads(COCO128_JSON.read_text())
    chosen = sorted({a["image_id"] for a in content["annotations"] if not a["iscrowd"]})[:count]
    content["images"] = [image for image in content["images"] if image["id"] in chosen]
    content["annotations"] = [a for a in content["annotations"] if a["image_id"] in chosen]
    if edit is not None:
        edit(content)
    (root / "annotations").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "annotations" / "instances_train2017.json").write_text(json.dumps(content))
    for image in content["images"]:
        source = COCO128_DIR / "train2017" / image["file_name"]
        if source.is_file():
            (root / "train2017" / image["file_name"]).symlink_to(source)
    return root


@needs_coco128
def test_coco128_boxes_labels_and_crowds_are_the_json_s():
    data = load_detection_data(f"coco:{COCO128_DIR}", "train2017", None)
    content = json.loads(COCO128_JSON.read_text())
    split = data.train
    assert len(split) == 128 and sum(len(r.labels) for r in split.records) == 939
    assert data.category_ids == sorted(c["id"] for c in content["categories"]) and len(data.classes) == 80
    assert data.classes[0] == "person" and data.classes[-1] == "toothbrush"
    records = {r.image_id: r for r in split.records}
    seen = {image_id: 0 for image_id in records}
    for annotation in content["annotations"]:
        record = records[annotation["image_id"]]
        index = seen[annotation["image_id"]]
        seen[annotation["image_id"]] += 1
        x, y, w, h = annotation["bbox"]
        torch.testing.assert_close(record.boxes[index], torch.tensor([x, y, x + w, y + h], dtype=torch.float32),
                                   rtol=0, atol=1e-4)
        assert data.category_ids[record.labels[index] - 1] == annotation["category_id"]
        assert bool(record.ignored[index]) == bool(annotation["iscrowd"])
    assert sum(int(r.ignored.sum()) for r in split.records) == 10
    assert split.skipped["images without boxes"] == 2
    first = split.records[0]
    assert first.path == COCO128_DIR / "train2017" / "000000000009.jpg" and (first.width, first.height) == (640, 480)
    assert load_image(first).shape == (3, 480, 640)


@needs_coco128
def test_training_images_leave_out_crowds_and_images_without_boxes():
    split = load_detection_data(f"coco:{COCO128_DIR}", "train2017", None).train
    images = TrainingImages(split)
    assert len(images) == 126
    crowded = next(r for r in images.records if r.ignored.any())
    position = images.records.index(crowded)
    _, target = images[position, False]
    assert len(target["labels"]) == int((~crowded.ignored).sum())


@needs_coco128
def test_a_flipped_image_comes_with_its_boxes_mirrored():
    split = load_detection_data(f"coco:{COCO128_DIR}", "train2017", None).train
    images = TrainingImages(split)
    image, target = images[0, False]
    flipped, flipped_target = images[0, True]
    assert torch.equal(flipped, image.flip(-1))
    width = image.shape[-1]
    expected = torch.stack([width - target["boxes"][:, 2], target["boxes"][:, 1], width - target["boxes"][:, 0],
                            target["boxes"][:, 3]], 1)
    torch.testing.assert_close(flipped_target["boxes"], expected)
    # the pixels under a box move with it: the mean colour inside the box and inside its mirror are the same
    x1, y1, x2, y2 = target["boxes"][0].round().int().tolist()
    fx1, _, fx2, _ = flipped_target["boxes"][0].round().int().tolist()
    assert torch.equal(image[:, y1:y2, x1:x2].flip(-1), flipped[:, y1:y2, fx1:fx2])


def test_batches_are_a_function_of_seed_and_iteration_so_a_resumed_run_sees_the_same():
    whole = list(FlipBatchSampler(10, 3, seed=5, start=0, stop=8, flip=True))
    resumed = list(FlipBatchSampler(10, 3, seed=5, start=4, stop=8, flip=True))
    assert resumed == whole[4:]
    flips = [flip for batch in whole for _, flip in batch]
    assert 0 < sum(flips) < len(flips)
    assert all(not flip for batch in FlipBatchSampler(10, 3, 5, 0, 8, flip=False) for _, flip in batch)


@needs_coco128
def test_a_box_outside_the_image_is_a_counted_skip_not_an_error(tmp_path):
    def outside(content):
        content["annotations"][0]["bbox"] = [5000.0, 10.0, 20.0, 20.0]

    split = load_detection_data(f"coco:{coco_subset(tmp_path, 3, outside)}", "train2017", None).train
    assert split.skipped["boxes with no area in the image"] == 1
    record = next(r for r in split.records if r.image_id == json.loads(
        (tmp_path / "annotations" / "instances_train2017.json").read_text())["annotations"][0]["image_id"])
    boxes, _ = record.training_target()
    assert len(boxes) == len(record.labels) - int(record.ignored.sum()) - 1


@needs_coco128
@pytest.mark.parametrize(("edit", "message"), [
    (lambda c: c["annotations"][1].update(bbox=[1, 2, 3]), "annotation id .*bbox must be"),
    (lambda c: c["annotations"][1].update(bbox=[1, 2, float("nan"), 3]), "bbox must be"),
    (lambda c: c["annotations"][1].update(bbox=[1, 2, -3, 4]), "negative width or height"),
    (lambda c: c["annotations"][1].update(image_id=999_999_999), "image id 999999999, which is not in its images"),
    (lambda c: c["annotations"][1].update(category_id=1000), "category id 1000, which is not in its categories"),
    (lambda c: c["images"][0].update(width="640"), "width='640'"),
    (lambda c: c.update(images={}), "'images' must be a list"),
])
def test_malformed_coco_annotations_are_errors_naming_the_file(tmp_path, edit, message):
    root = coco_subset(tmp_path, 2, edit)
    with pytest.raises(ValueError, match=message) as error:
        load_detection_data(f"coco:{root}", "train2017", None)
    assert "instances_train2017.json" in str(error.value)


@needs_coco128
def test_a_missing_image_or_annotation_file_or_invalid_json_is_named(tmp_path):
    root = coco_subset(tmp_path / "missing", 3)
    victim = sorted((root / "train2017").iterdir())[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=f"1 image.*{victim.name}"):
        load_detection_data(f"coco:{root}", "train2017", None)
    with pytest.raises(FileNotFoundError, match="instances_val2017.json.*found: instances_train2017.json"):
        load_detection_data(f"coco:{root}", None, "val2017")
    (root / "annotations" / "instances_train2017.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="instances_train2017.json: not valid JSON"):
        load_detection_data(f"coco:{root}", "train2017", None)


@needs_coco128
def test_an_unreadable_image_or_one_of_another_size_is_an_error_naming_it(tmp_path):
    root = coco_subset(tmp_path, 2)
    split = load_detection_data(f"coco:{root}", "train2017", None).train
    first, second = split.records
    first.path.unlink()
    first.path.write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=f"cannot read {first.path}"):
        load_image(first)
    second.path.unlink()
    Image.new("RGB", (10, 12)).save(second.path, format="JPEG")
    with pytest.raises(ValueError, match=f"{second.path} is 10x12 but its annotation says"):
        load_image(second)


def write_voc(root: Path, objects_by_image: dict[str, list[str]], size=(40, 30)) -> Path:
    """A VOCdevkit year folder: JPEGs, one XML per image holding the given <object> elements, trainval.txt."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for stem, objects in objects_by_image.items():
        Image.new("RGB", size, (90, 120, 30)).save(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename><size><width>{size[0]}</width><height>{size[1]}</height>"
            f"<depth>3</depth></size>{''.join(objects)}</annotation>")
    (root / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(objects_by_image) + "\n")
    return root


def voc_object(name: str, box: tuple, difficult: int = 0) -> str:
    xmin, ymin, xmax, ymax = box
    return (f"<object><name>{name}</name><pose>Left</pose><truncated>0</truncated><difficult>{difficult}</difficult>"
            f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


def test_voc_boxes_are_read_in_the_continuous_frame_and_difficult_objects_are_ignored(tmp_path):
    root = write_voc(tmp_path / "VOC2007", {
        "000001": [voc_object("dog", (1, 1, 40, 30)), voc_object("person", (5, 6, 20, 25), difficult=1)],
        "000002": [voc_object("tvmonitor", (10, 3, 12, 9))],
    })
    data = load_detection_data(f"voc:{root}", "trainval", None)
    assert data.classes == list(VOC_CLASSES) and data.category_ids is None
    first, second = data.train.records
    # xmin=1..xmax=40 is the whole 40-pixel-wide image: [0, 40) in the continuous frame
    assert first.boxes.tolist() == [[0, 0, 40, 30], [4, 5, 20, 25]]
    assert first.labels.tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("person") + 1]
    assert first.ignored.tolist() == [False, True] and second.image_id == "000002"
    assert voc_box(first.boxes).tolist() == [[1, 1, 40, 30], [5, 6, 20, 25]]
    boxes, labels = first.training_target()
    assert boxes.tolist() == [[0, 0, 40, 30]] and labels.tolist() == [VOC_CLASSES.index("dog") + 1]
    assert data.train.skipped["ignored objects"] == 1


@pytest.mark.parametrize(("xml", "message"), [
    ("<annotation><size><width>40</width>", "not valid XML"),
    ("<annotation><size><width>40</width><height>30</height></size>" + voc_object("unicorn", (1, 1, 5, 5))
     + "</annotation>", "object name 'unicorn' is not a VOC class"),
    ("<annotation><size><width>40</width><height>30</height></size>"
     "<object><name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>x</xmax><ymax>5</ymax></bndbox></object>"
     "</annotation>", "<bndbox/xmax> must be a number, got 'x'"),
    ("<annotation><size><width>0</width><height>30</height></size></annotation>", "image size 0.0x30.0"),
])
def test_malformed_voc_annotations_are_errors_naming_the_file(tmp_path, xml, message):
    root = write_voc(tmp_path / "VOC2007", {"000001": []})
    (root / "Annotations" / "000001.xml").write_text(xml)
    with pytest.raises(ValueError, match=message) as error:
        load_detection_data(f"voc:{root}", "trainval", None)
    assert str(root / "Annotations" / "000001.xml") in str(error.value)


def test_voc_missing_files_and_unknown_specs_are_named(tmp_path):
    root = write_voc(tmp_path / "VOC2007", {"000001": [voc_object("cat", (1, 1, 5, 5))]})
    with pytest.raises(FileNotFoundError, match="ImageSets/Main/test.txt"):
        load_detection_data(f"voc:{root}", None, "test")
    (root / "JPEGImages" / "000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000001.jpg"):
        load_detection_data(f"voc:{root}", "trainval", None)
    shutil.rmtree(root / "Annotations")
    with pytest.raises(FileNotFoundError, match="Annotations/000001.xml"):
        load_detection_data(f"voc:{root}", "trainval", None)
    with pytest.raises(ValueError, match="valid forms are coco:PATH"):
        load_detection_data(f"cifar10:{root}", "trainval", None)
    assert np.array_equal(voc_box(torch.tensor([[0.0, 0.0, 3.0, 4.0]])), [[1.0, 1.0, 3.0, 4.0]])
