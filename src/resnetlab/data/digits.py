"""scikit-learn's 8x8 digits: bundled with scikit-learn, so it needs no download."""

from __future__ import annotations

import numpy as np

from resnetlab.data.datasets import FIXED_SPLIT_SEED, DataSplits, array_dataset, stratified_split

_DIGITS_TEST = 360


def load_digits() -> DataSplits:
    from sklearn.datasets import load_digits  # slow to import; only this dataset needs it

    digits = load_digits()
    images = (digits.images.astype(np.int64) * 255 // 16).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = stratified_split(labels, _DIGITS_TEST, FIXED_SPLIT_SEED)
    note = (f"scikit-learn 8x8 digits ({len(labels):,} images): split {len(train_idx):,} train / "
            f"{len(test_idx):,} test (stratified, fixed seed {FIXED_SPLIT_SEED})")
    return DataSplits("digits", array_dataset(images[train_idx], labels[train_idx]),
                      array_dataset(images[test_idx], labels[test_idx]), None,
                      [str(digit) for digit in range(10)], in_channels=1, image_size=8, flip=False, note=note)
