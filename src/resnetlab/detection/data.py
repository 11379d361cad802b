"""Detection data in its official on-disk formats: COCO (JSON) and PASCAL VOC (XML), read into one form.

``coco:PATH`` is the COCO 2017 layout: ``PATH/annotations/instances_<split>.json`` and the images in
``PATH/<split>/``. ``voc:PATH`` is one year of a VOCdevkit (``PATH`` = ``VOCdevkit/VOC2007``): ``Annotations/*.xml``,
``JPEGImages/*.jpg`` and ``ImageSets/Main/<split>.txt``.

Every image becomes an :class:`ImageRecord` holding all its objects as boxes ``(x1, y1, x2, y2)`` in pixels of a
continuous frame (pixel i spans [i, i+1)), labels 1..K (0 is the background) and an ``ignored`` flag. Ignored
objects are the ones the official evaluations ignore: COCO's crowd regions and VOC's ``difficult`` objects. They
and boxes with no area inside the image are left out of the training targets (a counted skip); the evaluation
keeps them, as the reference tools do. Malformed files are a ValueError naming the file, and a missing image is a
FileNotFoundError naming it, raised when the data is loaded rather than during training.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from resnetlab.data.batches import IndexStream, leave_stop_signals_to_the_loop
from resnetlab.data.datasets import PILLOW_DECODE_ERRORS

DETECTION_KINDS = ("coco", "voc")
DETECTION_SPEC_FORMS = "coco:PATH (annotations/instances_<split>.json + <split>/), voc:PATH (VOCdevkit/VOC2007)"
DEFAULT_SPLITS = {"coco": ("train2017", "val2017"), "voc": ("trainval", "test")}
VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
               "tvmonitor")
# Seed offset of the flip stream (see resnetlab.data.batches): flips never share a seed with the permutation.
_FLIP_STREAM = 3_000_017


@dataclass
class ImageRecord:
    path: Path
    image_id: int | str  # COCO's integer id, or VOC's file stem
    width: int
    height: int
    boxes: torch.Tensor  # float32 (N, 4) xyxy, as annotated (not clipped)
    labels: torch.Tensor  # int64 (N,), 1..K
    ignored: torch.Tensor  # bool (N,): crowd (COCO) or difficult (VOC)

    def training_target(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The boxes and labels the detector learns: not ignored, clipped to the image, with positive area."""
        keep, boxes = trainable_boxes(self)
        return boxes[keep], self.labels[keep]


def trainable_boxes(record: ImageRecord) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask of the objects that are training targets, all boxes clipped to the image)."""
    boxes = record.boxes.clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, record.width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, record.height)
    positive = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return positive & ~record.ignored, boxes


@dataclass
class DetectionSplit:
    """One split of a detection dataset: its images, and what reading it skipped."""

    name: str
    records: list[ImageRecord]
    annotation_file: Path | None = None  # COCO: the JSON the COCO evaluation reads its ground truth from
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class DetectionData:
    kind: str  # "coco" or "voc"
    classes: list[str]  # names of labels 1..K
    category_ids: list[int] | None  # COCO ids of labels 1..K (None for VOC)
    train: DetectionSplit | None
    eval: DetectionSplit | None
    note: str


def parse_detection_spec(spec: str) -> tuple[str, Path]:
    kind, _, path = str(spec).partition(":")
    kind = kind.strip().lower()
    if kind not in DETECTION_KINDS or not path:
        raise ValueError(f"unknown detection dataset {spec!r}: valid forms are {DETECTION_SPEC_FORMS}")
    return kind, Path(path).expanduser()


def load_detection_data(spec: str, train_split: str | None = None, eval_split: str | None = None) -> DetectionData:
    """Read the splits named (None skips one). Both splits must share their classes."""
    kind, root = parse_detection_spec(spec)
    if not root.is_dir():
        raise FileNotFoundError(f"{kind}: no directory {root}")
    read = read_coco_split if kind == "coco" else read_voc_split
    names = [name for name in dict.fromkeys((train_split, eval_split)) if name is not None]  # each read once
    if not names:
        raise ValueError("no split to read: name a training or an evaluation split")
    loaded = {name: read(root, name) for name in names}
    (first, classes, category_ids), *others = loaded.values()
    for split, split_classes, split_ids in others:
        if (split_classes, split_ids) != (classes, category_ids):
            raise ValueError(f"{kind}: split {split.name} has other categories than {first.name}")
    note = "; ".join(describe(split) for split, _, _ in loaded.values())
    if train_split is not None and train_split == eval_split:
        note += "; trained and evaluated on the same images (a check of the pipeline, not a benchmark)"
    return DetectionData(kind, classes, category_ids, loaded[train_split][0] if train_split else None,
                         loaded[eval_split][0] if eval_split else None, f"{kind} {root}: {note}")


def describe(split: DetectionSplit) -> str:
    objects = sum(len(r.labels) for r in split.records)
    skips = ", ".join(f"{count} {what}" for what, count in split.skipped.items() if count)
    return f"{split.name} {len(split):,} images, {objects:,} objects" + (f" (skipped for training: {skips})"
                                                                          if skips else "")


def count_training_skips(records: list[ImageRecord]) -> dict[str, int]:
    ignored = sum(int(r.ignored.sum()) for r in records)
    empty_boxes = sum(int((~trainable_boxes(r)[0] & ~r.ignored).sum()) for r in records)
    without_targets = sum(not trainable_boxes(r)[0].any() for r in records)
    return {"ignored objects": ignored, "boxes with no area in the image": empty_boxes,
            "images without boxes": without_targets}


# --------------------------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------------------------


def read_coco_split(root: Path, split: str) -> tuple[DetectionSplit, list[str], list[int]]:
    annotation_file = root / "annotations" / f"instances_{split}.json"
    image_dir = root / split
    if not annotation_file.is_file():
        present = sorted(p.name for p in (root / "annotations").glob("instances_*.json"))
        raise FileNotFoundError(f"coco: no annotation file {annotation_file} (found: {', '.join(present) or 'none'})")
    try:
        content = json.loads(annotation_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{annotation_file}: not valid JSON: {error}") from None
    if not isinstance(content, dict):
        raise ValueError(f"{annotation_file}: expected a JSON object with images, annotations and categories")
    images, annotations, categories = (coco_list(content, key, annotation_file)
                                       for key in ("images", "annotations", "categories"))

    names = {}
    for category in categories:
        category_id, name = coco_field(category, "id", int, annotation_file), coco_field(category, "name", str,
                                                                                         annotation_file)
        if category_id in names:
            raise ValueError(f"{annotation_file}: category id {category_id} appears twice")
        names[category_id] = name
    category_ids = sorted(names)
    label_of = {category_id: label for label, category_id in enumerate(category_ids, start=1)}

    objects: dict[int, list[tuple[list[float], int, bool]]] = {}
    image_info = {}
    for image in images:
        image_id = coco_field(image, "id", int, annotation_file)
        if image_id in image_info:
            raise ValueError(f"{annotation_file}: image id {image_id} appears twice")
        width, height = (coco_field(image, key, int, annotation_file) for key in ("width", "height"))
        if width < 1 or height < 1:
            raise ValueError(f"{annotation_file}: image id {image_id} has size {width}x{height}")
        image_info[image_id] = (coco_field(image, "file_name", str, annotation_file), width, height)
        objects[image_id] = []
    for annotation in annotations:
        where = f"{annotation_file}: annotation id {annotation.get('id', '?') if isinstance(annotation, dict) else '?'}"
        image_id = coco_field(annotation, "image_id", int, annotation_file)
        category_id = coco_field(annotation, "category_id", int, annotation_file)
        if image_id not in image_info:
            raise ValueError(f"{where} refers to image id {image_id}, which is not in its images")
        if category_id not in label_of:
            raise ValueError(f"{where} has category id {category_id}, which is not in its categories")
        bbox = annotation.get("bbox")
        if (not isinstance(bbox, list) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                           for v in bbox)):
            raise ValueError(f"{where}: bbox must be [x, y, width, height] (4 finite numbers), got {bbox!r}")
        if bbox[2] < 0 or bbox[3] < 0:
            raise ValueError(f"{where}: bbox {bbox} has a negative width or height")
        x, y, w, h = bbox
        objects[image_id].append(([x, y, x + w, y + h], label_of[category_id], bool(annotation.get("iscrowd", 0))))

    records = []
    for image_id, (file_name, width, height) in image_info.items():
        boxes, labels, ignored = zip(*objects[image_id]) if objects[image_id] else ((), (), ())
        records.append(make_record(image_dir / file_name, image_id, width, height, boxes, labels, ignored))
    check_images_exist(records, annotation_file)
    split_data = DetectionSplit(split, records, annotation_file, count_training_skips(records))
    return split_data, [names[i] for i in category_ids], category_ids


def coco_list(content: dict, key: str, path: Path) -> list:
    value = content.get(key)
    if not isinstance(value, list):
        raise ValueError(f"{path}: '{key}' must be a list, got {type(value).__name__}")
    return value


def coco_field(entry: object, key: str, kind: type, path: Path):
    value = entry.get(key) if isinstance(entry, dict) else None
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{path}: an entry has {key}={value!r}; it must be "
                         f"{'an integer' if kind is int else 'a string'} ({str(entry)[:120]})")
    return value


def make_record(path: Path, image_id: int | str, width: int, height: int, boxes, labels, ignored) -> ImageRecord:
    return ImageRecord(path, image_id, width, height,
                       torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                       torch.tensor(labels, dtype=torch.int64), torch.tensor(ignored, dtype=torch.bool))


def check_images_exist(records: list[ImageRecord], listed_in: Path) -> None:
    missing = [r.path for r in records if not r.path.is_file()]
    if missing:
        raise FileNotFoundError(f"{listed_in} lists {len(missing)} image(s) that do not exist, e.g. {missing[0]}")


# --------------------------------------------------------------------------------------------------------------
# PASCAL VOC
# --------------------------------------------------------------------------------------------------------------


def read_voc_split(root: Path, split: str) -> tuple[DetectionSplit, list[str], None]:
    list_file = root / "ImageSets" / "Main" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"voc: no image list {list_file} (voc:PATH is a year folder such as "
                                "VOCdevkit/VOC2007, holding Annotations/, JPEGImages/ and ImageSets/Main/)")
    stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if not stems:
        raise ValueError(f"{list_file} lists no images")
    records = [read_voc_annotation(root / "Annotations" / f"{stem}.xml", root / "JPEGImages" / f"{stem}.jpg", stem)
               for stem in stems]
    check_images_exist(records, list_file)
    return DetectionSplit(split, records, None, count_training_skips(records)), list(VOC_CLASSES), None


def read_voc_annotation(xml_path: Path, image_path: Path, stem: str) -> ImageRecord:
    """One VOC XML file. Its pixel coordinates are 1-based and inclusive: xmin=1..xmax=W covers the whole
    image, which is [xmin - 1, xmax] in the continuous frame."""
    if not xml_path.is_file():
        raise FileNotFoundError(f"voc: no annotation file {xml_path}")
    try:
        tree = ElementTree.parse(xml_path)
    except ElementTree.ParseError as error:
        raise ValueError(f"{xml_path}: not valid XML: {error}") from None
    width, height = (voc_number(tree.getroot(), f"size/{key}", xml_path) for key in ("width", "height"))
    if width < 1 or height < 1 or width != int(width) or height != int(height):
        raise ValueError(f"{xml_path}: image size {width}x{height} is not a positive whole number of pixels")
    boxes, labels, difficult = [], [], []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in VOC_CLASSES:
            raise ValueError(f"{xml_path}: object name {name!r} is not a VOC class ({', '.join(VOC_CLASSES)})")
        xmin, ymin, xmax, ymax = (voc_number(obj, f"bndbox/{key}", xml_path)
                                  for key in ("xmin", "ymin", "xmax", "ymax"))
        boxes.append([xmin - 1, ymin - 1, xmax, ymax])
        labels.append(VOC_CLASSES.index(name) + 1)
        difficult.append(voc_number(obj, "difficult", xml_path, default=0) == 1)
    return make_record(image_path, stem, int(width), int(height), boxes, labels, difficult)


def voc_number(element: ElementTree.Element, path: str, xml_path: Path, default: float | None = None) -> float:
    text = element.findtext(path)
    if text is None and default is not None:
        return default
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{xml_path}: <{path}> must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{xml_path}: <{path}> must be finite, got {text!r}")
    return value


def voc_box(box: torch.Tensor) -> np.ndarray:
    """Continuous xyxy back to VOC's 1-based inclusive pixel coordinates (the frame its evaluation computes in)."""
    voc = box.detach().double().cpu().numpy().copy()
    voc[..., :2] += 1
    return voc


# --------------------------------------------------------------------------------------------------------------
# Images and training batches
# --------------------------------------------------------------------------------------------------------------


def load_image(record: ImageRecord) -> torch.Tensor:
    """The image as uint8 (3, H, W) RGB; an unreadable file, or one whose size is not the annotated one, is a
    ValueError naming it."""
    try:
        with Image.open(record.path) as img:
            image = img.convert("RGB")
    except (*PILLOW_DECODE_ERRORS, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read {record.path} as an image: {error}") from None
    if image.size != (record.width, record.height):
        raise ValueError(f"{record.path} is {image.size[0]}x{image.size[1]} but its annotation says "
                         f"{record.width}x{record.height}")
    return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1)))


class TrainingImages(torch.utils.data.Dataset):
    """Images with training targets, indexed by (index, flip): a horizontally flipped image comes with its
    boxes mirrored."""

    def __init__(self, split: DetectionSplit):
        self.records = [r for r in split.records if trainable_boxes(r)[0].any()]
        if not self.records:
            raise ValueError(f"split {split.name} has no image with a box to train on")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, bool]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        index, flip = item
        record = self.records[index]
        image = load_image(record)
        boxes, labels = record.training_target()
        if flip:
            image = image.flip(-1)
            boxes = torch.stack([record.width - boxes[:, 2], boxes[:, 1], record.width - boxes[:, 0], boxes[:, 3]], 1)
        return image, {"boxes": boxes, "labels": labels}


class FlipBatchSampler(torch.utils.data.Sampler):
    """The (index, flip) pairs of each iteration's batch, a pure function of (seed, iteration), so a resumed run
    sees the batches it would have seen."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, stop: int, flip: bool):
        self.stream = IndexStream(size, batch_size, seed)
        self.seed, self.start, self.stop, self.flip = seed, start, stop, flip

    def __iter__(self):
        for iteration in range(self.start, self.stop):
            indices = self.stream.batch(iteration).tolist()
            generator = torch.Generator().manual_seed(self.seed * _FLIP_STREAM + iteration)
            flips = (torch.rand(len(indices), generator=generator).lt(0.5).tolist() if self.flip
                     else [False] * len(indices))
            yield list(zip(indices, flips))

    def __len__(self) -> int:
        return self.stop - self.start


def training_batches(split: DetectionSplit, *, batch_size: int, seed: int, start: int, stop: int, flip: bool,
                     workers: int):
    """Lists of uint8 images and their targets, one list per iteration from `start` to `stop`."""
    images = TrainingImages(split)
    sampler = FlipBatchSampler(len(images), batch_size, seed, start, stop, flip)
    # Its own generator: otherwise the loader draws its workers' seed from the global one, which a resumed run
    # has just restored, and every later random draw (the RPN's and RoI sampling) would shift by one.
    return torch.utils.data.DataLoader(images, batch_sampler=sampler, num_workers=workers,
                                       collate_fn=images_and_targets, timeout=300 if workers else 0,
                                       worker_init_fn=leave_stop_signals_to_the_loop,
                                       generator=torch.Generator().manual_seed(seed * _FLIP_STREAM + start))


def images_and_targets(batch: list[tuple[torch.Tensor, dict]]) -> tuple[tuple, tuple]:
    """A batch as torchvision's detectors take it: a list of images (of any sizes) and a list of targets."""
    images, targets = zip(*batch)
    return images, targets
