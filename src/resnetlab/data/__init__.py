"""Reading datasets, one module per format: `cifar`, `mnist`, `digits`, `folder`; `downloads` fetches the official
files; `spec` parses ``--data`` and loads it (`load_dataset`) into the containers of `datasets`; `batches` and
`augment` turn their tensors into training and evaluation batches."""

from resnetlab.data.datasets import ArrayDataset, DataSplits, FolderDataset, ImageDataset, stratified_split
from resnetlab.data.downloads import ARCHIVES, MIRRORS, download, file_md5
from resnetlab.data.mnist import read_idx
from resnetlab.data.spec import KINDS, DatasetSpec, load_dataset

__all__ = [
    "ARCHIVES",
    "KINDS",
    "MIRRORS",
    "ArrayDataset",
    "DatasetSpec",
    "DataSplits",
    "FolderDataset",
    "ImageDataset",
    "download",
    "file_md5",
    "load_dataset",
    "read_idx",
    "stratified_split",
]
