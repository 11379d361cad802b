"""The two kinds of dataset and what they share: every format module reads its files into one of them.

- :class:`ArrayDataset`: a small dataset held in memory as uint8 tensors (CIFAR-10/100, MNIST, digits).
- :class:`FolderDataset`: an image folder (ImageNet layout) decoded lazily with Pillow; the trainer sets its
  ``transform``.

:class:`ImageDataset` names what both offer, so the trainer and the evaluation never ask which kind they have;
:class:`DataSplits` is what :func:`resnetlab.data.load_dataset` returns.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from resnetlab.data.augment import PAPER_SIZES, ImageSizes, ten_crops
from resnetlab.data.batches import (
    array_batches,
    array_evaluation_batches,
    folder_batches,
    folder_evaluation_batches,
    padding_for,
)

# Splits that must be the same in every run (they define the test set), whatever `seed` the caller passes.
FIXED_SPLIT_SEED = 0
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


class ImageDataset(Protocol):
    """What every dataset offers the trainer, the evaluation and int8 calibration (ArrayDataset, FolderDataset)."""

    @property
    def labels(self) -> torch.Tensor: ...

    def __len__(self) -> int: ...

    def subset(self, indices: np.ndarray) -> ImageDataset: ...

    def training_batches(self, *, batch_size: int, seed: int, start: int, stop: int, flip: bool, padding: int,
                         workers: int, rank: int = 0, world_size: int = 1
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def evaluation_batches(self, batch_size: int, workers: int = 0, limit: int | None = None
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def normalization_images(self) -> torch.Tensor: ...

    def test_views(self, mode: str, batch_size: int, workers: int, limit: int | None, padding: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


@dataclass
class ArrayDataset:
    """A whole small dataset in memory: uint8 images (N, C, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.images),):
            raise ValueError(f"labels must be int64 ({len(self.images)},), got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        self.images = self.images.contiguous()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ArrayDataset:
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        return ArrayDataset(self.images[index], self.labels[index])

    # Each kind of dataset supplies its own batches: the trainer and the evaluation never ask which kind it is.

    def training_batches(self, *, batch_size: int, seed: int, start: int, stop: int, flip: bool, padding: int,
                         workers: int, rank: int = 0, world_size: int = 1
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Padded (`padding` is for 32-pixel images, scaled to these), cropped and flipped as whole-batch ops."""
        return array_batches(self.images, self.labels, batch_size=batch_size, seed=seed, start=start, stop=stop,
                             flip=flip, padding=padding_for(self.images.shape[-1], padding), rank=rank,
                             world_size=world_size)

    def evaluation_batches(self, batch_size: int, workers: int = 0, limit: int | None = None
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return array_evaluation_batches(self.images, self.labels, batch_size, limit)

    def normalization_images(self) -> torch.Tensor:
        return self.images

    def test_views(self, mode: str, batch_size: int, workers: int, limit: int | None, padding: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """10crop: (10, N, C, side, side) crops of the images padded as in training; multiscale: the images."""
        side = self.images.shape[-1]
        pad = padding_for(side, padding)
        for images, labels in self.evaluation_batches(batch_size, limit=limit):
            yield (ten_crops(F.pad(images, (pad, pad, pad, pad)), side) if mode == "10crop" else images), labels


class FolderDataset(torch.utils.data.Dataset):
    """Images in ``root/<class name>/*.jpg|jpeg|png``, decoded with Pillow when indexed (in DataLoader workers).

    Labels are the positions of the class names in ``classes`` (the sorted subfolder names unless given, so a
    validation folder can reuse the training folder's list). At construction every file's header is opened
    (cheap: no pixel decoding); empty files and files Pillow does not recognise are left out and listed in
    ``skipped`` as (path, reason). ``transform`` maps the RGB PIL image to a tensor; with None an item is the full
    image as a uint8 (3, H, W) tensor. ``sizes`` are those of the training and testing views (ImageSizes).
    """

    def __init__(self, root: Path, transform: Callable[[Image.Image], torch.Tensor] | None,
                 classes: list[str] | None = None, sizes: ImageSizes = PAPER_SIZES) -> None:
        self.root = Path(root)
        self.transform = transform
        self.sizes = sizes
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder: no directory {self.root}: expected one subfolder per class holding "
                                    f"{'/'.join(IMAGE_SUFFIXES)} files")
        found = sorted(entry.name for entry in os.scandir(self.root) if entry.is_dir())
        if classes is None:
            classes = found
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ValueError(f"folder: {self.root} has class folders {unknown} that are not among the "
                             f"{len(classes)} training classes")
        if not classes:
            raise ValueError(f"folder: {self.root} has no class subfolders: expected root/<class>/<image files>")
        self.classes = list(classes)
        self.samples: list[tuple[Path, int]] = []
        self.skipped: list[tuple[Path, str]] = []
        for label, name in enumerate(self.classes):
            class_dir = self.root / name
            if not class_dir.is_dir():
                continue
            for path in sorted(class_dir.rglob("*")):
                if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                    continue
                reason = _unreadable_reason(path)
                if reason is None:
                    self.samples.append((path, label))
                else:
                    self.skipped.append((path, reason))

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([label for _, label in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        # A file that passed the header scan can still be truncated further on. One bad file must not end a
        # multi-day run, so warn and serve the next sample that decodes.
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                with Image.open(path) as img:
                    image = img.convert("RGB")
            except (*PILLOW_DECODE_ERRORS, Image.DecompressionBombError) as error:
                warnings.warn(f"{path}: cannot decode ({error}); using the next image instead", RuntimeWarning,
                              stacklevel=2)
                continue
            if self.transform is None:
                return torch.from_numpy(np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1))), label
            return self.transform(image), label
        raise ValueError(f"folder: no image in {self.root} could be decoded")

    def subset(self, indices: np.ndarray) -> FolderDataset:
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices]
        return part

    def training_batches(self, *, batch_size: int, seed: int, start: int, stop: int, flip: bool, padding: int,
                         workers: int, rank: int = 0, world_size: int = 1
                         ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Scale augmentation decoded in `workers` DataLoader processes (`padding` is for array datasets)."""
        return folder_batches(self, batch_size=batch_size, seed=seed, start=start, stop=stop, flip=flip,
                              workers=workers, rank=rank, world_size=world_size)

    def evaluation_batches(self, batch_size: int, workers: int = 0, limit: int | None = None
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return folder_evaluation_batches(self.bounded(limit), batch_size, workers, transform=self.sizes.center_view())

    def bounded(self, limit: int | None) -> FolderDataset:
        """At most `limit` images, evenly spaced: the images are in class order, so the first ones would be one
        class."""
        return self if limit is None or limit >= len(self) else self.subset(evenly_spaced(len(self), limit))

    def normalization_images(self) -> torch.Tensor:
        """Up to 2,000 center crops of all classes: enough for a per-pixel mean, without decoding a large folder."""
        return torch.cat([images for images, _ in self.evaluation_batches(250, limit=2000)])

    def test_views(self, mode: str, batch_size: int, workers: int, limit: int | None, padding: int
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """10crop: (10, N, 3, crop, crop) crops of the images resized to `sizes.resize` (224 of 256 at resolution 1);
        multiscale: the images whole, consecutive images of one size batched together (photographs of one camera,
        or a folder resized to one size, go through the network batch_size at a time)."""
        if mode == "10crop":
            for images, labels in folder_evaluation_batches(self.bounded(limit), batch_size, workers,
                                                            transform=self.sizes.ten_crop_view()):
                yield images.transpose(0, 1), labels
            return
        whole = folder_evaluation_batches(self.bounded(limit), 1, workers, transform=None)
        yield from same_size_batches(whole, batch_size)


def same_size_batches(singles: Iterator[tuple[torch.Tensor, torch.Tensor]], batch_size: int
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of up to batch_size consecutive (1, C, H, W) images of one size, in their order."""
    images: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    for image, label in singles:
        if images and (len(images) == batch_size or image.shape != images[0].shape):
            yield torch.cat(images), torch.cat(labels)
            images, labels = [], []
        images.append(image)
        labels.append(label)
    if images:
        yield torch.cat(images), torch.cat(labels)


def evenly_spaced(size: int, count: int) -> np.ndarray:
    """`count` indices (fewer if size is smaller) spread evenly over range(size), first and last included."""
    return np.unique(np.linspace(0, size - 1, min(count, size)).round().astype(np.int64))


# What Pillow raises for a damaged file besides OSError (UnidentifiedImageError is one): ValueError for a PNG whose
# IHDR chunk claims length 0, SyntaxError for a broken chunk; both found by fuzzing (tests/test_bad_input.py).
PILLOW_DECODE_ERRORS = (OSError, ValueError, SyntaxError)


def _unreadable_reason(path: Path) -> str | None:
    """Why Pillow cannot use ``path`` (judged from its header only), or None if it looks like an image."""
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with Image.open(path):
            return None
    except PILLOW_DECODE_ERRORS as error:
        return f"not an image: {error}"
    except Image.DecompressionBombError as error:  # a header claiming gigapixels: decoding it could exhaust memory
        return f"too large: {error}"


@dataclass
class DataSplits:
    """What the trainer gets: the splits plus what it needs to build the network and the augmentation."""

    name: str
    train: ImageDataset
    test: ImageDataset
    val: ImageDataset | None
    classes: list[str]
    in_channels: int
    image_size: int  # side after loading: 32 for CIFAR and MNIST (padded), 8 for digits; folder: the crop size
    flip: bool  # False for digits: a mirrored digit is another glyph
    note: str  # one line: where the data came from and how it was split
    names: dict[str, str] = field(default_factory=dict)  # readable names of classes that have one (synsets.txt)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        """What a person reads for each class: "tench" for n01440764 where a synsets file names it."""
        return [self.names.get(name, name) for name in self.classes]


def stratified_split(labels: np.ndarray, n_second: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (first, second) with ``n_second`` in the second part, class proportions kept.

    Each class gives floor(its share) items, and the few left over go to the classes with the largest
    remainders, so the total is exact and no class is off by more than one.
    """
    labels = np.asarray(labels)
    if not 0 < n_second < len(labels):
        raise ValueError(f"cannot take {n_second} of {len(labels)} items: need 0 < n < {len(labels)}")
    classes, counts = np.unique(labels, return_counts=True)
    share = counts * n_second / len(labels)
    take = np.floor(share).astype(np.int64)
    largest_remainders = np.argsort(-(share - take), kind="stable")
    take[largest_remainders[: n_second - take.sum()]] += 1
    rng = np.random.default_rng(seed)
    second = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:k]
                             for c, k in zip(classes, take, strict=True)])
    in_first = np.ones(len(labels), dtype=bool)
    in_first[second] = False
    return np.flatnonzero(in_first), np.sort(second)


def array_dataset(images: np.ndarray, labels: np.ndarray) -> ArrayDataset:
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))
