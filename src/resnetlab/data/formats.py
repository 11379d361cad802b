"""Every dataset resnetlab reads, in its real on-disk format, and the downloader that fetches them.

A dataset is named by a spec string: ``cifar10:PATH``, ``cifar100:PATH``, ``mnist:PATH``, ``folder:PATH`` or
``digits``. :func:`load_dataset` turns a spec into :class:`DataSplits` (train / test / optional val):

- CIFAR-10/100, MNIST and digits are small, so they are held in memory as uint8 tensors (:class:`ArrayDataset`).
- ``folder`` (ImageNet-style, one subfolder per class) is decoded lazily with Pillow (:class:`FolderDataset`);
  the trainer sets its ``transform``.

CIFAR's "python version" files are pickles, and unpickling can run arbitrary code. They are read with
:class:`_NumpyOnlyUnpickler`, which refuses everything except the few numpy names an array needs, so a tampered
file fails with an error instead of executing.
"""

from __future__ import annotations

import copy
import gzip
import hashlib
import http.client
import math
import os
import pickle
import shutil
import struct
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

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

KINDS = ("cifar10", "cifar100", "mnist", "folder", "digits")
SPEC_FORMS = "cifar10:PATH, cifar100:PATH, mnist:PATH, folder:PATH, digits"
DEFAULT_CACHE_DIR = Path("~/.cache/resnetlab")

# Splits that must be the same in every run (they define the test set), whatever `seed` the caller passes.
FIXED_SPLIT_SEED = 0

# Official download locations (tried in order) and md5s. Module-level so tests can point them at a local server.
MIRRORS: dict[str, list[str]] = {
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "cifar100": ["https://www.cs.toronto.edu/~kriz/"],
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
}
ARCHIVES: dict[str, dict[str, str]] = {
    "cifar10": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
    "cifar100": {"cifar-100-python.tar.gz": "eb9058c3a382ffc7106e4002c42a8d85"},
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
}
RETRY_BACKOFF_S = 1.0  # seconds before retry k is k * RETRY_BACKOFF_S
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------------------------------------------
# Dataset containers
# --------------------------------------------------------------------------------------------------------------


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
        return array_batches(self, batch_size=batch_size, seed=seed, start=start, stop=stop, flip=flip,
                             padding=padding_for(self.images.shape[-1], padding), rank=rank, world_size=world_size)

    def evaluation_batches(self, batch_size: int, workers: int = 0, limit: int | None = None
                           ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return array_evaluation_batches(self, batch_size, limit)

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
    train: ArrayDataset | FolderDataset
    test: ArrayDataset | FolderDataset
    val: ArrayDataset | FolderDataset | None
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


# --------------------------------------------------------------------------------------------------------------
# Spec and entry point
# --------------------------------------------------------------------------------------------------------------


class DatasetSpec(NamedTuple):
    """A parsed ``--data`` value: ``kind:PATH`` (PATH None for digits, or for a download cache)."""

    kind: str
    path: Path | None

    @classmethod
    def parse(cls, spec: str) -> DatasetSpec:
        kind, _, path = spec.partition(":")
        kind = kind.strip().lower()
        if kind not in KINDS:
            raise ValueError(f"unknown dataset {spec!r}: valid kinds are {SPEC_FORMS}")
        if kind == "digits" and path:
            raise ValueError(f"dataset {spec!r}: digits takes no path (scikit-learn bundles it); use 'digits'")
        if kind == "folder" and not path:
            raise ValueError(f"dataset {spec!r}: folder needs a path: folder:PATH")
        return cls(kind, Path(path).expanduser() if path else None)


def load_dataset(spec: str | DatasetSpec, *, val_size: int = 0, seed: int = 0, download: bool = False,
                 cache_dir: Path | None = None, resolution: float = 1.0) -> DataSplits:
    """Load the dataset named by ``spec`` (a string is parsed by :meth:`DatasetSpec.parse`).

    ``val_size > 0`` moves that many training images, stratified by class and chosen with ``seed``, into ``val``
    (the paper's CIFAR 45k/5k split is ``val_size=5000``). For cifar10/cifar100/mnist the data directory is PATH,
    or ``cache_dir/<kind>`` (default ``~/.cache/resnetlab``) without one; ``download=True`` fetches the official
    files there when they are missing. ``resolution`` scales every image size of an image folder's views
    (ImageSizes.scaled); the small datasets are used at their own size.
    """
    kind, path = spec if isinstance(spec, DatasetSpec) else DatasetSpec.parse(spec)
    if val_size < 0:
        raise ValueError(f"val_size must be >= 0, got {val_size}")
    if resolution != 1 and kind != "folder":
        raise ValueError(f"--resolution {resolution:g} scales the image sizes of folder data (the ImageNet recipe); "
                         f"{kind} images are used at their own size: leave it at 1")
    if kind in ("cifar10", "cifar100", "mnist") and path is None:
        path = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser() / kind
    if kind in ("cifar10", "cifar100"):
        splits = _load_cifar(kind, path, download)
    elif kind == "mnist":
        splits = _load_mnist(path, download)
    elif kind == "digits":
        splits = _load_digits()
    else:
        splits = _load_folder(path, ImageSizes.scaled(resolution))
    if val_size == 0:
        return splits
    if val_size >= len(splits.train):
        raise ValueError(f"val_size={val_size} must be smaller than the training set ({len(splits.train)} images)")
    keep, held_out = stratified_split(splits.train.labels.numpy(), val_size, seed)
    return replace(splits, train=splits.train.subset(keep), val=splits.train.subset(held_out),
                   note=f"{splits.note}; val: {val_size:,} training images held out (stratified, seed {seed})")


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


# --------------------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (the "python version" pickles)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _CifarLayout:
    title: str
    folder: str  # what the official archive extracts to
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes


_CIFAR = {
    "cifar10": _CifarLayout("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)),
                            "test_batch", "batches.meta", b"labels", b"label_names"),
    "cifar100": _CifarLayout("CIFAR-100", "cifar-100-python", ("train",), "test", "meta", b"fine_labels",
                             b"fine_label_names"),
}

# The globals a pickled numpy array needs, under numpy 1 and numpy 2 module names. `_codecs.encode` is how
# Python 3 pickles bytes at protocol 2 and `_frombuffer` how numpy arrays pickle at protocol 5: both appear in
# re-pickled copies of CIFAR and only build bytes / arrays.
_PICKLE_ALLOWED = {
    *((f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")),
    *((f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}
_NUMPY_CORE = "numpy._core" if int(np.__version__.split(".")[0]) >= 2 else "numpy.core"


class RefusedPickleError(pickle.UnpicklingError, ValueError):
    """A pickle that asks for a global outside the numpy allow-list: refused before anything runs."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts/lists/bytes/numpy arrays and refuses any other global (which could run code)."""

    def __init__(self, file, source: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLE_ALLOWED:
            raise RefusedPickleError(
                f"{self.source}: refusing to unpickle {module}.{name}: a CIFAR file holds only numpy arrays, "
                f"lists and bytes, so this file is not a genuine CIFAR batch (loading it could run code)")
        for old in ("numpy.core", "numpy._core"):  # files from either numpy major version load in the other
            if module.startswith(old + "."):
                module = _NUMPY_CORE + module[len(old):]
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as file:
        try:
            content = _NumpyOnlyUnpickler(file, path).load()
        except RefusedPickleError:
            raise
        except Exception as error:  # noqa: BLE001 - damaged pickles fail in many ways (EOFError, KeyError, ...)
            raise ValueError(f"{path}: not a readable pickle, so not a CIFAR batch ({type(error).__name__}: "
                             f"{error})") from None
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a pickled dict, found {type(content).__name__}")
    return content


def _get(content: dict, key: bytes, path: Path):
    if key not in content:
        raise ValueError(f"{path}: no {key!r} entry (has {', '.join(sorted(map(repr, content)))})")
    return content[key]


def _read_cifar_batch(path: Path, layout: _CifarLayout, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    content = _unpickle(path)
    data, labels = _get(content, b"data", path), _get(content, layout.label_key, path)
    try:
        data, labels = np.asarray(data), np.asarray(labels)
    except ValueError as error:  # ragged nested lists
        raise ValueError(f"{path}: data and labels must be arrays ({error})") from None
    if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.dtype.kind not in "iu"
            or labels.shape != (len(data),)):
        raise ValueError(f"{path}: expected uint8 data (N, 3072) and N integer labels, found data {data.dtype} "
                         f"{data.shape} and labels {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and not 0 <= labels.min() <= labels.max() < num_classes:
        raise ValueError(f"{path}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    # Each row is the 1024 red, then green, then blue values of a 32x32 image, each plane row-major.
    return data.reshape(-1, 3, 32, 32), labels


def _find_cifar_dir(data_dir: Path, layout: _CifarLayout) -> Path | None:
    """The directory holding the batches: data_dir itself or its extracted-archive subfolder."""
    for candidate in (data_dir / layout.folder, data_dir):
        if any((candidate / name).exists() for name in (*layout.train_files, layout.test_file, layout.meta_file)):
            return candidate
    return None


def _load_cifar(kind: str, data_dir: Path, download: bool) -> DataSplits:
    layout = _CIFAR[kind]
    archive_name = next(iter(ARCHIVES[kind]))
    expected = (f"expected {layout.folder}/ with {_describe_files(layout)} (the python version, "
                f"{archive_name}, extracted)")
    batch_dir = _find_cifar_dir(data_dir, layout)
    if batch_dir is None and download:
        archive = _fetch(kind, data_dir)[0]
        _extract_tar_gz(archive, data_dir)
        batch_dir = _find_cifar_dir(data_dir, layout)
    if batch_dir is None:
        raise FileNotFoundError(f"{kind}: no {layout.title} batches in {data_dir}: {expected}"
                                + ("" if download else "; or pass download=True"))
    for name in (*layout.train_files, layout.test_file, layout.meta_file):
        if not (batch_dir / name).is_file():
            raise FileNotFoundError(f"{kind}: missing {batch_dir / name}: {expected}")

    meta = batch_dir / layout.meta_file
    names = _get(_unpickle(meta), layout.names_key, meta)
    if not isinstance(names, list) or not all(isinstance(name, (bytes, str)) for name in names):
        raise ValueError(f"{meta}: {layout.names_key!r} must be a list of class names, found {names!r:.80}")
    classes = [name.decode("utf-8", "replace") if isinstance(name, bytes) else name for name in names]
    train = [_read_cifar_batch(batch_dir / name, layout, len(classes)) for name in layout.train_files]
    test_images, test_labels = _read_cifar_batch(batch_dir / layout.test_file, layout, len(classes))
    train_set = _array_dataset(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]))
    test_set = _array_dataset(test_images, test_labels)
    note = f"{layout.title} from {batch_dir}: {len(train_set):,} train / {len(test_set):,} test (official split)"
    return DataSplits(kind, train_set, test_set, None, classes, in_channels=3, image_size=32, flip=True, note=note)


def _describe_files(layout: _CifarLayout) -> str:
    train = (f"data_batch_1..{len(layout.train_files)}" if len(layout.train_files) > 1 else layout.train_files[0])
    return f"{train}, {layout.test_file} and {layout.meta_file}"


def _array_dataset(images: np.ndarray, labels: np.ndarray) -> ArrayDataset:
    return ArrayDataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)))


# --------------------------------------------------------------------------------------------------------------
# MNIST (IDX files, raw or gzip)
# --------------------------------------------------------------------------------------------------------------

_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # magic numbers: unsigned bytes, 3 dimensions / 1 dimension
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_PAD = 2  # 28x28 -> 32x32, the input size of the CIFAR networks


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array in an IDX file (gzip-compressed or not), checked against its header.

    ``magic`` is 2051 for an image file (N x rows x cols) or 2049 for a label file (N).
    """
    with open(path, "rb") as file:
        compressed = file.read(2) == b"\x1f\x8b"
    try:
        if compressed:
            with gzip.open(path) as file:
                raw = file.read()
        else:
            raw = Path(path).read_bytes()
    except (EOFError, OSError, zlib.error) as error:
        raise ValueError(f"{path}: corrupt gzip stream ({error})") from None
    what = "image" if magic == _IDX_IMAGES else "label"
    found_magic = int.from_bytes(raw[:4], "big")
    if found_magic != magic:
        raise ValueError(f"{path}: not an IDX {what} file: magic number {found_magic}, expected {magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: IDX {what} file truncated: {len(raw)} bytes, shorter than its "
                         f"{header}-byte header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected, found = math.prod(shape), len(raw) - header
    if found != expected:
        problem = "truncated" if found < expected else "longer than its header says"
        unit = "pixels" if magic == _IDX_IMAGES else "labels"
        raise ValueError(f"{path}: IDX {what} file {problem}: header says {'x'.join(map(str, shape))} = "
                         f"{expected} bytes of {unit}, found {found}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(data_dir: Path, name: str) -> Path | None:
    return next((p for p in (data_dir / name, data_dir / f"{name}.gz") if p.is_file()), None)


def _read_mnist_pair(data_dir: Path, images_name: str, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    images_path, labels_path = _find_idx(data_dir, images_name), _find_idx(data_dir, labels_name)
    images, labels = read_idx(images_path, _IDX_IMAGES), read_idx(labels_path, _IDX_LABELS)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"{images_path}: MNIST images must be 28x28, header says {images.shape[1]}x{images.shape[2]}")
    if len(labels) != len(images):
        raise ValueError(f"{labels_path}: {len(labels)} labels for the {len(images)} images in {images_path}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{labels_path}: MNIST labels must lie in 0..9, found {labels.max()}")
    padded = np.zeros((len(images), 1, 28 + 2 * _MNIST_PAD, 28 + 2 * _MNIST_PAD), dtype=np.uint8)
    padded[:, 0, _MNIST_PAD:-_MNIST_PAD, _MNIST_PAD:-_MNIST_PAD] = images
    return padded, labels.astype(np.int64)


def _load_mnist(data_dir: Path, download: bool) -> DataSplits:
    def present(split: str) -> bool:
        return all(_find_idx(data_dir, name) for name in _MNIST_FILES[split])

    if download and not (present("train") and present("test")):
        _fetch("mnist", data_dir)
    if not present("test"):
        wanted = ", ".join(f"{name}[.gz]" for names in _MNIST_FILES.values() for name in names)
        raise FileNotFoundError(f"mnist: no {_MNIST_FILES['test'][0]}[.gz] / {_MNIST_FILES['test'][1]}[.gz] in "
                                f"{data_dir}: expected the IDX files {wanted}"
                                + ("" if download else "; or pass download=True"))
    test_images, test_labels = _read_mnist_pair(data_dir, *_MNIST_FILES["test"])
    classes = [str(digit) for digit in range(10)]
    if present("train"):
        train_set = _array_dataset(*_read_mnist_pair(data_dir, *_MNIST_FILES["train"]))
        test_set = _array_dataset(test_images, test_labels)
        note = f"MNIST from {data_dir}: {len(train_set):,} train / {len(test_set):,} test (official split)"
    else:
        # Only the test set is there (as in the shared data of this project): split it, always the same way.
        train_idx, test_idx = stratified_split(test_labels, len(test_labels) // 5, FIXED_SPLIT_SEED)
        train_set = _array_dataset(test_images[train_idx], test_labels[train_idx])
        test_set = _array_dataset(test_images[test_idx], test_labels[test_idx])
        note = (f"MNIST from {data_dir}: no training files, so its {len(test_labels):,}-image t10k set is split "
                f"{len(train_set):,} train / {len(test_set):,} test (stratified, fixed seed {FIXED_SPLIT_SEED})")
    return DataSplits("mnist", train_set, test_set, None, classes, in_channels=1, image_size=32, flip=False,
                      note=note)


# --------------------------------------------------------------------------------------------------------------
# scikit-learn's 8x8 digits (needs no download)
# --------------------------------------------------------------------------------------------------------------

_DIGITS_TEST = 360


def _load_digits() -> DataSplits:
    from sklearn.datasets import load_digits  # slow to import; only this dataset needs it

    digits = load_digits()
    images = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, _DIGITS_TEST, FIXED_SPLIT_SEED)
    note = (f"scikit-learn 8x8 digits ({len(labels):,} images): split {len(train_idx):,} train / "
            f"{len(test_idx):,} test (stratified, fixed seed {FIXED_SPLIT_SEED})")
    return DataSplits("digits", _array_dataset(images[train_idx], labels[train_idx]),
                      _array_dataset(images[test_idx], labels[test_idx]), None,
                      [str(digit) for digit in range(10)], in_channels=1, image_size=8, flip=False, note=note)


# --------------------------------------------------------------------------------------------------------------
# Image folders (ImageNet layout)
# --------------------------------------------------------------------------------------------------------------

_FOLDER_TEST_FRACTION = 0.2


CLASS_NAME_FILES = ("synsets.txt", "classes.txt")  # "n01440764 tench" lines, ImageNet's LOC_synset_mapping form


def read_class_names(root: Path) -> dict[str, str]:
    """Readable class names from the first of CLASS_NAME_FILES in `root`: each line is a class folder's name, a
    space and the name people use; a line with the folder name alone names nothing."""
    path = next((root / name for name in CLASS_NAME_FILES if (root / name).is_file()), None)
    if path is None:
        return {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"folder: cannot read the class names in {path}: {error}") from None
    pairs = (line.strip().split(None, 1) for line in lines)
    return {pair[0]: pair[1] for pair in pairs if len(pair) == 2}


def _load_folder(root: Path, sizes: ImageSizes) -> DataSplits:
    if not root.is_dir():
        raise FileNotFoundError(f"folder: no directory {root}: expected root/train/<class>/ and root/val/<class>/ "
                                f"(or root/<class>/ to split 80/20) holding {'/'.join(IMAGE_SUFFIXES)} files")
    # ImageNet's labelled evaluation set is val/, so it is the test set when both val/ and test/ exist.
    test_dir = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        train = FolderDataset(root / "train", None, sizes=sizes)
        test = FolderDataset(test_dir, None, classes=train.classes, sizes=sizes)
        skipped = len(train.skipped) + len(test.skipped)
        note = (f"image folders {root / 'train'} ({len(train):,} images, {len(train.classes)} classes) and "
                f"{test_dir} ({len(test):,} images)")
    else:
        base = root / "train" if (root / "train").is_dir() else root
        whole = FolderDataset(base, None, sizes=sizes)
        train_idx, test_idx = stratified_split(whole.labels.numpy(), round(_FOLDER_TEST_FRACTION * len(whole)),
                                               FIXED_SPLIT_SEED)
        train, test = whole.subset(train_idx), whole.subset(test_idx)
        skipped = len(whole.skipped)
        note = (f"image folders in {base} ({len(whole):,} images, {len(whole.classes)} classes): each class split "
                f"80/20 into {len(train):,} train / {len(test):,} test (fixed seed {FIXED_SPLIT_SEED})")
    if skipped:
        note += f"; skipped {skipped} unreadable files (see .skipped)"
    return DataSplits("folder", train, test, None, train.classes, in_channels=3, image_size=sizes.crop, flip=True,
                      note=note, names=read_class_names(root))


# --------------------------------------------------------------------------------------------------------------
# Downloading
# --------------------------------------------------------------------------------------------------------------


class _ShortRead(OSError):
    """The connection ended before Content-Length bytes arrived."""


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str, *, retries: int = 3, timeout: float = 30,
             progress: bool = True) -> Path:
    """Fetch ``url`` to ``dest`` and check its md5; return ``dest``.

    Bytes go to ``dest + '.part'``; an interrupted download resumes from there with an HTTP Range request (from
    byte 0 when the server ignores Range). Only a complete file whose md5 matches is renamed to ``dest``, so a
    file under the final name is always whole. Connection errors are retried ``retries`` times with a short
    backoff. An existing ``dest`` with the right md5 returns at once.
    """
    dest = Path(dest)
    if dest.is_file():
        if file_md5(dest) == md5:
            return dest
        dest.unlink()  # stale or corrupt: fetch it again
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_suffix(dest.suffix + ".part")
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(RETRY_BACKOFF_S * attempt)
        try:
            _fetch_into(url, part, timeout, progress)
            break
        except urllib.error.HTTPError as error:
            if error.code == 416:  # the part file is not a prefix of what the server has: start over
                part.unlink(missing_ok=True)
            elif error.code < 500:
                raise OSError(f"{url}: HTTP {error.code} {error.reason}") from None
            last_error: Exception = error
        except (OSError, http.client.HTTPException) as error:  # URLError, reset, timeout, short or bad response
            last_error = error
    else:
        raise OSError(f"{url}: download failed after {retries + 1} attempts: {last_error}")
    actual = file_md5(part)
    if actual != md5:
        part.unlink()
        raise ValueError(f"{url}: md5 mismatch: expected {md5}, got {actual}; the partial file was deleted")
    os.replace(part, dest)
    return dest


def _fetch_into(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of ``url`` to ``part`` (all of it when the server does not honour Range), fsynced."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as response:
        if offset and response.status != 206:
            offset = 0
        length = response.headers.get("Content-Length")
        remaining = int(length) if length is not None else None
        total = offset + remaining if remaining is not None else None
        received, shown = 0, -1
        with open(part, "ab" if offset else "wb") as file:
            while chunk := response.read(1 << 16):
                file.write(chunk)
                received += len(chunk)
                if progress and total:
                    percent = 100 * (offset + received) // total
                    if percent != shown:
                        shown = percent
                        print(f"\r{url.rsplit('/', 1)[-1]}: {percent}% of {total / 1e6:.1f} MB", end="",
                              file=sys.stderr, flush=True)
            file.flush()
            os.fsync(file.fileno())
        if progress and total:
            print(file=sys.stderr)
        if remaining is not None and received < remaining:
            raise _ShortRead(f"{url}: connection closed after {offset + received} of {total} bytes")


def _fetch(kind: str, data_dir: Path) -> list[Path]:
    """Download every official file of ``kind`` into ``data_dir``, trying each mirror in turn."""
    fetched = []
    for filename, md5 in ARCHIVES[kind].items():
        errors = []
        for base in MIRRORS[kind]:
            try:
                fetched.append(download(base + filename, data_dir / filename, md5))
                break
            except (OSError, ValueError) as error:
                errors.append(str(error))
        else:
            raise OSError(f"{kind}: could not download {filename}: " + " | ".join(errors))
    return fetched


def _extract_tar_gz(archive: Path, dest: Path) -> None:
    """Extract ``archive`` into ``dest``, refusing members that would land outside it (or links, devices).

    Members are extracted into a temporary folder and moved into place at the end, so an interrupted extraction
    leaves no half-filled dataset folder.
    """
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            if Path(member.name).is_absolute() or ".." in Path(member.name).parts:
                raise ValueError(f"{archive}: refusing member {member.name!r}: it points outside the target folder")
            if not (member.isfile() or member.isdir()):
                raise ValueError(f"{archive}: refusing member {member.name!r}: only files and folders are expected")
        staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest))
        try:
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(staging, members=members, **extra)
            for entry in staging.iterdir():
                os.replace(entry, dest / entry.name)
        finally:
            shutil.rmtree(staging)
