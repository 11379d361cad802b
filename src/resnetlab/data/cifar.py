"""CIFAR-10 and CIFAR-100 in their official "python version" files (pickled batches).

Unpickling can run arbitrary code, so the files are read with :class:`_NumpyOnlyUnpickler`, which refuses
everything except the few numpy names an array needs: a tampered file fails with an error instead of executing.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnetlab.data.datasets import DataSplits, array_dataset
from resnetlab.data.downloads import ARCHIVES, extract_tar_gz, fetch


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


def load_cifar(kind: str, data_dir: Path, download: bool) -> DataSplits:
    layout = _CIFAR[kind]
    archive_name = next(iter(ARCHIVES[kind]))
    expected = (f"expected {layout.folder}/ with {_describe_files(layout)} (the python version, "
                f"{archive_name}, extracted)")
    batch_dir = _find_cifar_dir(data_dir, layout)
    if batch_dir is None and download:
        archive = fetch(kind, data_dir)[0]
        extract_tar_gz(archive, data_dir)
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
    train_set = array_dataset(np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]))
    test_set = array_dataset(test_images, test_labels)
    note = f"{layout.title} from {batch_dir}: {len(train_set):,} train / {len(test_set):,} test (official split)"
    return DataSplits(kind, train_set, test_set, None, classes, in_channels=3, image_size=32, flip=True, note=note)


def _describe_files(layout: _CifarLayout) -> str:
    train = (f"data_batch_1..{len(layout.train_files)}" if len(layout.train_files) > 1 else layout.train_files[0])
    return f"{train}, {layout.test_file} and {layout.meta_file}"
