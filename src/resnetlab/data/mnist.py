"""MNIST in its official IDX files (raw or gzip), padded to 32x32."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

from resnetlab.data.datasets import FIXED_SPLIT_SEED, DataSplits, array_dataset, stratified_split
from resnetlab.data.downloads import fetch

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


def load_mnist(data_dir: Path, download: bool) -> DataSplits:
    def present(split: str) -> bool:
        return all(_find_idx(data_dir, name) for name in _MNIST_FILES[split])

    if download and not (present("train") and present("test")):
        fetch("mnist", data_dir)
    if not present("test"):
        wanted = ", ".join(f"{name}[.gz]" for names in _MNIST_FILES.values() for name in names)
        raise FileNotFoundError(f"mnist: no {_MNIST_FILES['test'][0]}[.gz] / {_MNIST_FILES['test'][1]}[.gz] in "
                                f"{data_dir}: expected the IDX files {wanted}"
                                + ("" if download else "; or pass download=True"))
    test_images, test_labels = _read_mnist_pair(data_dir, *_MNIST_FILES["test"])
    classes = [str(digit) for digit in range(10)]
    if present("train"):
        train_set = array_dataset(*_read_mnist_pair(data_dir, *_MNIST_FILES["train"]))
        test_set = array_dataset(test_images, test_labels)
        note = f"MNIST from {data_dir}: {len(train_set):,} train / {len(test_set):,} test (official split)"
    else:
        # Only the test set is there (as in the shared data of this project): split it, always the same way.
        train_idx, test_idx = stratified_split(test_labels, len(test_labels) // 5, FIXED_SPLIT_SEED)
        train_set = array_dataset(test_images[train_idx], test_labels[train_idx])
        test_set = array_dataset(test_images[test_idx], test_labels[test_idx])
        note = (f"MNIST from {data_dir}: no training files, so its {len(test_labels):,}-image t10k set is split "
                f"{len(train_set):,} train / {len(test_set):,} test (stratified, fixed seed {FIXED_SPLIT_SEED})")
    return DataSplits("mnist", train_set, test_set, None, classes, in_channels=1, image_size=32, flip=False,
                      note=note)
