"""Image folders in the ImageNet layout: root/train/<class>/ and root/val/<class>/, or root/<class>/ split 80/20."""

from __future__ import annotations

from pathlib import Path

from resnetlab.data.augment import ImageSizes
from resnetlab.data.datasets import FIXED_SPLIT_SEED, IMAGE_SUFFIXES, DataSplits, FolderDataset, stratified_split

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


def load_folder(root: Path, sizes: ImageSizes) -> DataSplits:
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
