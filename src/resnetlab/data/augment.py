"""The paper's data augmentation and preprocessing (He et al. 2015, Sec. 3.4 and 4.2).

CIFAR (Sec. 4.2): "4 pixels are padded on each side, and a 32x32 crop is randomly sampled from the padded image or its
horizontal flip", and "the per-pixel mean subtracted". `random_crop_flip` and `Normalize` do this on whole uint8
batches with tensor ops (no loop over images), because the trainer calls them on every batch.

ImageNet (Sec. 3.4): "the image is resized with its shorter side randomly sampled in [256, 480] ... a 224x224 crop is
randomly sampled from an image or its horizontal flip" (`ScaleAugment`, per image in DataLoader workers); validation
uses the usual resize-256 / center-224 (`CenterCrop`). Testing uses "the standard 10-crop testing" (`ten_crops`) and
fully-convolutional multi-scale testing with the shorter side resized to each scale (`resize_shorter`).
The paper's PCA colour augmentation is not implemented here.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# Images summed at once when fitting Normalize: bounds the float64 temporary (1024 CIFAR images = 25 MB).
_FIT_CHUNK = 1024


def _check_batch(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a 4-d tensor (N, C, H, W), got {shape}")


def random_crop_flip(
    images: torch.Tensor, *, padding: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Zero-pad each image by `padding`, take a random HxW crop of it, and mirror it with probability 1/2 if `flip`.

    images: uint8 (N, C, H, W) (any dtype works). Crop offsets are uniform in [0, 2*padding] along each axis,
    drawn independently per image. Returns a new contiguous tensor of the input's shape, dtype and device;
    the result is a function of the generator's state alone.
    """
    _check_batch(images)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0 and not flip:
        return images.clone()
    n, c, h, w = images.shape
    # Random numbers are drawn where the generator lives (a CPU generator cannot fill a CUDA tensor), then moved.
    rand_device = generator.device if generator is not None else images.device
    offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator, device=rand_device).to(images.device)
    flipped = torch.zeros(n, dtype=torch.bool, device=images.device)
    if flip:
        flipped = torch.rand(n, generator=generator, device=rand_device).lt(0.5).to(images.device)

    # One gather over each padded image, flattened: output pixel (i, j) reads padded row top + i and column
    # left + j, or left + (W-1-j) for a mirrored image, so cropping and flipping are a single indexing pass.
    padded = F.pad(images.contiguous(), (padding, padding, padding, padding))
    padded_h, padded_w = h + 2 * padding, w + 2 * padding
    ascending = torch.arange(w, device=images.device)
    rows = offsets[:, :1] + torch.arange(h, device=images.device)
    cols = offsets[:, 1:] + torch.where(flipped[:, None], ascending.flip(0), ascending)
    flat_index = (rows[:, :, None] * padded_w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, padded_h * padded_w).gather(2, flat_index).view(n, c, h, w)


class Normalize:
    """Maps uint8 images to float32 ``(x/255 - mean) / std``: the paper's per-pixel mean subtraction.

    `mean` is (C, H, W) when fitted per pixel, or (C, 1, 1) for per-channel statistics; `std` is (C, 1, 1) or None
    (no division, as in the paper). Both are float32 in [0, 1] units.

    A batch whose H, W differ from the fitted per-pixel mean (multi-scale testing, folder datasets of varying size)
    has no pixel-to-pixel correspondence with it, so the per-channel mean (the spatial average of the per-pixel mean)
    is subtracted instead. On natural images the per-pixel mean is nearly flat, so this is the closest
    size-independent equivalent, and it is exactly what a per-channel fit would have produced.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor | None = None):
        if mean.dim() != 3:
            raise ValueError(f"mean must be (C, H, W) or (C, 1, 1), got shape {tuple(mean.shape)}")
        channels = mean.shape[0]
        if std is not None and tuple(std.shape) != (channels, 1, 1):
            raise ValueError(f"std must have shape ({channels}, 1, 1) to match mean, got {tuple(std.shape)}")
        self.mean = mean.detach().to("cpu", torch.float32).contiguous()
        self.std = None if std is None else std.detach().to("cpu", torch.float32).contiguous()
        # (device, H, W) -> (scale, shift) with x * scale - shift == (x/255 - mean) / std; kept so the hot path
        # neither recomputes them nor copies them to the GPU on every batch.
        self._affine_cache: dict[tuple[torch.device, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def fit(cls, images: torch.Tensor, *, per_channel_std: bool = False) -> Normalize:
        """Per-pixel mean of uint8 (N, C, H, W) `images`; with `per_channel_std`, also the per-channel std of
        the mean-subtracted images, so that the normalized training set has unit std in every channel."""
        _check_batch(images)
        if images.dtype != torch.uint8:
            raise TypeError(f"Normalize.fit expects uint8 images, got {images.dtype}")
        if images.shape[0] == 0:
            raise ValueError("Normalize.fit needs at least one image, got an empty batch")
        count = images.shape[0]
        total = torch.zeros(images.shape[1:], dtype=torch.float64, device=images.device)
        for chunk in images.split(_FIT_CHUNK):
            total += chunk.sum(0, dtype=torch.float64)
        mean_levels = total / count
        std = None
        if per_channel_std:
            # A second pass over the deviations from the per-pixel mean, rather than E[x^2] - mean^2, which cancels
            # badly: a constant channel must come out exactly 0.
            squared = torch.zeros_like(total)
            for chunk in images.split(_FIT_CHUNK):
                squared += (chunk.to(torch.float64) - mean_levels).square().sum(0)
            std = (squared / count).mean((1, 2), keepdim=True).sqrt() / 255.0
            # A constant channel has nothing to scale; dividing by 1 keeps it finite (as sklearn's StandardScaler).
            std = torch.where(std > 0, std, torch.ones_like(std))
        mean = mean_levels / 255.0
        return cls(mean.float().cpu(), None if std is None else std.float().cpu())

    @classmethod
    def fit_channels(cls, mean: Sequence[float], std: Sequence[float] | None = None) -> Normalize:
        """Per-channel statistics given directly (in [0, 1] units), e.g. estimated from a sample of a folder dataset."""
        mean_t = torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1)
        if std is None:
            return cls(mean_t)
        std_t = torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1)
        if std_t.shape != mean_t.shape:
            raise ValueError(f"std has {std_t.shape[0]} channels but mean has {mean_t.shape[0]}")
        if (std_t <= 0).any():
            raise ValueError(f"std must be positive in every channel, got {list(std)}")
        return cls(mean_t, std_t)

    def state_dict(self) -> dict[str, torch.Tensor | None]:
        return {"mean": self.mean.clone(), "std": None if self.std is None else self.std.clone()}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor | None]) -> Normalize:
        if "mean" not in state:
            raise KeyError(f"Normalize state needs a 'mean' entry, got keys {sorted(state)}")
        return cls(state["mean"], state.get("std"))

    def mean_for(self, height: int, width: int) -> torch.Tensor:
        """The mean subtracted from images of this size: the fitted one if it matches, else its per-channel mean."""
        if self.mean.shape[1:] in ((height, width), (1, 1)):
            return self.mean
        return self.mean.mean((1, 2), keepdim=True)

    def _affine(self, device: torch.device, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (device, height, width)
        if key not in self._affine_cache:
            std = self.std if self.std is not None else torch.ones(1, 1, 1)
            scale = (1.0 / (255.0 * std)).to(device)
            shift = (self.mean_for(height, width) / std).to(device)
            self._affine_cache[key] = (scale, shift)
        return self._affine_cache[key]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        _check_batch(images)
        if images.dtype != torch.uint8:
            raise TypeError(f"Normalize expects a uint8 batch, got {images.dtype}")
        if images.shape[1] != self.mean.shape[0]:
            raise ValueError(f"batch has {images.shape[1]} channels but Normalize was fitted on {self.mean.shape[0]}")
        scale, shift = self._affine(images.device, images.shape[2], images.shape[3])
        # `.float()` keeps the memory format (channels_last stays channels_last); the rest runs in place on it.
        return images.float().mul_(scale).sub_(shift)

    def __repr__(self) -> str:
        std = "None" if self.std is None else f"{self.std.flatten().tolist()}"
        return f"Normalize(mean={tuple(self.mean.shape)}, std={std})"


def resized_size(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) after scaling so the shorter side is `shorter`, keeping the aspect ratio."""
    if width <= height:
        return shorter, max(shorter, round(height * shorter / width))
    return max(shorter, round(width * shorter / height)), shorter


def _resized_crop(img: Image.Image, resized: tuple[int, int], left: int, top: int, crop: int,
                  flip: bool) -> torch.Tensor:
    """The crop x crop window at (left, top) of `img` resized to `resized`, as uint8 (3, crop, crop).

    Only the window is resampled: PIL's `box` maps it back onto the source, with filter support taken from the whole
    image, which gives the pixels of resizing everything and then cropping (to within 1 from rounding) at a fraction
    of the cost.
    """
    img = img.convert("RGB")
    sx, sy = img.width / resized[0], img.height / resized[1]
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    # PIL's BILINEAR widens its filter when downscaling, i.e. it is antialiased.
    window = img.resize((crop, crop), Image.BILINEAR, box=box)
    if flip:
        window = window.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.array(window)).permute(2, 0, 1).contiguous()


class ImageSizes(NamedTuple):
    """The image sizes of the paper's ImageNet pipeline (Sec. 3.4): training images resized to a shorter side in
    [min_size, max_size] and cropped to crop x crop; validation and 10-crop views from the shorter side resized to
    `resize`. `scaled` multiplies all of them by one factor, so that a small machine trains the paper's networks on
    smaller images in the paper's proportions (multi-scale testing follows the crop: evaluate.multiscale_sides)."""

    min_size: int = 256
    max_size: int = 480
    crop: int = 224
    resize: int = 256

    @classmethod
    def scaled(cls, resolution: float) -> ImageSizes:
        return cls(*(round(size * resolution) for size in cls()))

    def center_view(self) -> CenterCrop:
        return CenterCrop(self.resize, self.crop)

    def ten_crop_view(self) -> FolderTenCrops:
        return FolderTenCrops(self.resize, self.crop)

    def training_view(self, *, flip: bool, seed: int | None) -> ScaleAugment:
        return ScaleAugment(self.min_size, self.max_size, self.crop, flip=flip, seed=seed)


PAPER_SIZES = ImageSizes()


class ScaleCropParams(NamedTuple):
    resized: tuple[int, int]  # (width, height) the image is resized to; min of the two is the sampled scale
    left: int
    top: int
    flip: bool


class ScaleAugment:
    """The paper's ImageNet training augmentation, for one PIL image at a time (a FolderDataset transform).

    Resize so the shorter side is uniform in [min_size, max_size] (bilinear, antialiased), take a random
    crop x crop window, mirror it with probability 1/2; returns uint8 (3, crop, crop).

    Randomness: each process gets its own `random.Random`, created on first use there. In a DataLoader worker it
    is seeded from the worker's torch seed (``get_worker_info().seed``, which is ``torch.initial_seed()`` in that
    worker: the loader's per-epoch base seed + worker id), so workers differ from each other and from epoch to epoch,
    and a run is reproducible under ``torch.manual_seed``. `seed`, if given, is mixed in; in the main process it
    alone seeds the stream (without it, ``torch.initial_seed()`` does).
    """

    def __init__(self, min_size: int = 256, max_size: int = 480, crop: int = 224, flip: bool = True,
                 seed: int | None = None):
        if not 0 < crop <= min_size <= max_size:
            raise ValueError(f"need 0 < crop <= min_size <= max_size, got crop={crop}, min_size={min_size}, "
                             f"max_size={max_size}")
        self.min_size, self.max_size, self.crop, self.flip, self.seed = min_size, max_size, crop, flip, seed
        self._rng: random.Random | None = None
        self._rng_pid: int | None = None

    def _generator(self) -> random.Random:
        # A pid check, not just "is None": a forked worker inherits the parent's generator and would repeat its draws.
        if self._rng is None or self._rng_pid != os.getpid():
            worker = torch.utils.data.get_worker_info()
            if worker is not None:
                seed: int | str = f"{self.seed}:{worker.seed}"
            else:
                seed = self.seed if self.seed is not None else torch.initial_seed()
            self._rng, self._rng_pid = random.Random(seed), os.getpid()
        return self._rng

    def sample(self, width: int, height: int) -> ScaleCropParams:
        """Draw the resize, crop position and flip for an image of this size (advances the generator)."""
        rng = self._generator()
        resized = resized_size(width, height, rng.randint(self.min_size, self.max_size))
        left = rng.randint(0, resized[0] - self.crop)
        top = rng.randint(0, resized[1] - self.crop)
        return ScaleCropParams(resized, left, top, self.flip and rng.random() < 0.5)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        params = self.sample(img.width, img.height)
        return _resized_crop(img, params.resized, params.left, params.top, self.crop, params.flip)

    def __repr__(self) -> str:
        return f"ScaleAugment(min_size={self.min_size}, max_size={self.max_size}, crop={self.crop}, flip={self.flip})"


class CenterCrop:
    """Validation preprocessing: resize the shorter side to `resize`, take the central crop x crop window."""

    def __init__(self, resize: int = 256, crop: int = 224):
        if not 0 < crop <= resize:
            raise ValueError(f"need 0 < crop <= resize, got crop={crop}, resize={resize}")
        self.resize, self.crop = resize, crop

    def __call__(self, img: Image.Image) -> torch.Tensor:
        resized = resized_size(img.width, img.height, self.resize)
        left, top = (resized[0] - self.crop) // 2, (resized[1] - self.crop) // 2
        return _resized_crop(img, resized, left, top, self.crop, flip=False)

    def __repr__(self) -> str:
        return f"CenterCrop(resize={self.resize}, crop={self.crop})"


def ten_crops(images: torch.Tensor, crop: int) -> torch.Tensor:
    """The paper's 10-crop testing: (10, N, C, crop, crop) in the order top-left, top-right, bottom-left,
    bottom-right, center, then the same five mirrored horizontally. Center offsets round down."""
    _check_batch(images)
    h, w = images.shape[-2:]
    if not 0 < crop <= min(h, w):
        raise ValueError(f"crop must be in [1, {min(h, w)}] for {h}x{w} images, got {crop}")
    top, left = (h - crop) // 2, (w - crop) // 2
    corners_and_center = torch.stack(
        [
            images[..., :crop, :crop],
            images[..., :crop, w - crop :],
            images[..., h - crop :, :crop],
            images[..., h - crop :, w - crop :],
            images[..., top : top + crop, left : left + crop],
        ]
    )
    return torch.cat([corners_and_center, corners_and_center.flip(-1)])


class FolderTenCrops:
    """PIL image -> uint8 (10, 3, crop, crop): the shorter side resized to `resize`, then `ten_crops`."""

    def __init__(self, resize: int = 256, crop: int = 224):
        self.resize, self.crop = resize, crop

    def __call__(self, img: Image.Image) -> torch.Tensor:
        resized = img.convert("RGB").resize(resized_size(img.width, img.height, self.resize), Image.BILINEAR)
        pixels = torch.from_numpy(np.array(resized)).permute(2, 0, 1)
        return ten_crops(pixels[None], self.crop)[:, 0]


def resize_shorter(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of a float (N, C, H, W) batch so min(H, W) == size, keeping the aspect ratio
    (antialiased when shrinking). Returns the input itself when it already has that size."""
    _check_batch(images)
    if not images.is_floating_point():
        raise TypeError(f"resize_shorter expects a float batch, got {images.dtype}")
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    h, w = images.shape[-2:]
    new_w, new_h = resized_size(w, h, size)
    if (new_h, new_w) == (h, w):
        return images
    return F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=size < min(h, w))
