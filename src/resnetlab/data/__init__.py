"""Reading datasets: every format resnetlab understands lives in :mod:`resnetlab.data.formats`."""

from resnetlab.data.formats import (
    ARCHIVES,
    KINDS,
    MIRRORS,
    ArrayDataset,
    DatasetSpec,
    DataSplits,
    FolderDataset,
    download,
    file_md5,
    load_dataset,
    read_idx,
    stratified_split,
)

__all__ = [
    "ARCHIVES",
    "KINDS",
    "MIRRORS",
    "ArrayDataset",
    "DatasetSpec",
    "DataSplits",
    "FolderDataset",
    "download",
    "file_md5",
    "load_dataset",
    "read_idx",
    "stratified_split",
]
