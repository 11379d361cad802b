"""The ``--data`` spec and the one entry point that turns it into datasets.

A dataset is named by a spec string: ``cifar10:PATH``, ``cifar100:PATH``, ``mnist:PATH``, ``folder:PATH`` or
``digits``. :meth:`DatasetSpec.parse` is the one parser of it; :func:`load_dataset` reads the data through the
module of its format (`cifar`, `mnist`, `digits`, `folder`) into :class:`~resnetlab.data.datasets.DataSplits`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

from resnetlab.data.augment import ImageSizes
from resnetlab.data.cifar import load_cifar
from resnetlab.data.datasets import DataSplits, stratified_split
from resnetlab.data.digits import load_digits
from resnetlab.data.folder import load_folder
from resnetlab.data.mnist import load_mnist

KINDS = ("cifar10", "cifar100", "mnist", "folder", "digits")
SPEC_FORMS = "cifar10:PATH, cifar100:PATH, mnist:PATH, folder:PATH, digits"
DEFAULT_CACHE_DIR = Path("~/.cache/resnetlab")


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
        splits = load_cifar(kind, path, download)
    elif kind == "mnist":
        splits = load_mnist(path, download)
    elif kind == "digits":
        splits = load_digits()
    else:
        splits = load_folder(path, ImageSizes.scaled(resolution))
    if val_size == 0:
        return splits
    if val_size >= len(splits.train):
        raise ValueError(f"val_size={val_size} must be smaller than the training set ({len(splits.train)} images)")
    keep, held_out = stratified_split(splits.train.labels.numpy(), val_size, seed)
    return replace(splits, train=splits.train.subset(keep), val=splits.train.subset(held_out),
                   note=f"{splits.note}; val: {val_size:,} training images held out (stratified, seed {seed})")
