"""Evaluation: class scores of a dataset in the paper's three testing modes, ensembles, and predictions.

Modes (He et al. 2015, Sec. 3.4 and Table 3):

- ``center``: each image once, as seen during validation (array images as they are; folder images resized to 256
  on the shorter side and center-cropped to 224).
- ``10crop``: the four corner crops, the center crop and the horizontal flips of all five; softmax scores are
  averaged. The crops are of the training input size, taken from the image the training crops were taken from:
  folder images resized to 256 on the shorter side (224 crops); small array images (CIFAR, MNIST, digits)
  zero-padded as in training (4 pixels at 32x32, `padding_for`), so the 10 crops are the extreme and central
  positions of the training's random crop. Data never mirrored in training (MNIST, digits: a mirrored digit is
  another glyph) is refused it: the mirrored views are wrong (a MNIST net: 71% error on them, 8.6% centered).
- ``multiscale``: fully convolutional (the global average pool accepts any size): the shorter side is resized to
  each of the paper's scales {224, 256, 384, 480, 640} (for 224 training crops; other training sizes in the same
  ratios) and the softmax scores are averaged. Images are normalized at their loaded size (the per-pixel mean fits
  there) and the normalized batch is resized; resizing is linear, so this equals subtracting the equally resized
  mean. The paper tests multi-scale on ImageNet only and its CIFAR nets on "the single view of the original 32x32
  image"; on small images the mode is worse, not better (a MNIST net: 80.9% top-1 error against 8.6% centered),
  so nets trained on images of at most 64x64 are refused it.

`evaluate_checkpoints` makes these refusals; `mode_probabilities` computes any mode it is asked for. Measurements:
docs/benchmarks.md, section 6.

The views of a batch go through the network together: 10crop's 10 crops of batch_size // 10 images as one batch
of views, multiscale's images at each scale as one batch.

An ensemble averages the softmax scores of several checkpoints, each with its own normalization.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from resnetlab.checkpoint import checkpoint_path, load_model
from resnetlab.data.augment import PAPER_SIZES, Normalize, resize_shorter
from resnetlab.data.formats import PILLOW_DECODE_ERRORS, ArrayDataset, DatasetSpec, FolderDataset, load_dataset
from resnetlab.export import fast_inference
from resnetlab.precision import Precision, autocast, inference_device, resolve_precision
from resnetlab.progress import Progress
from resnetlab.quantize import int8_inference, run_calibration_batch
from resnetlab.recipes import recorded_resolution

MODES = ("center", "10crop", "multiscale")
# The paper's multi-scale testing: shorter sides relative to its 224 training crops.
PAPER_SCALES = (224, 256, 384, 480, 640)
PAPER_CROP = 224
# Nets trained on images this small (CIFAR and padded MNIST 32, digits 8) are tested on the single original view.
LARGEST_SMALL_IMAGE = 64
TEN_CROP_VIEWS = 10


@torch.no_grad()
def class_probabilities(model: nn.Module, data: ArrayDataset | FolderDataset, normalize: Normalize, *,
                        device: torch.device, batch_size: int = 500, precision: Precision = "fp32",
                        memory_format: torch.memory_format = torch.contiguous_format, workers: int = 0,
                        limit: int | None = None, progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax scores (N, classes) of the un-augmented images, in eval mode, and their labels. With `progress`, a
    progress line of that label counts the images."""
    was_training = model.training
    model.eval()
    scores, labels = [], []
    bar = images_progress(data, limit, progress)
    try:
        for images, batch_labels in data.evaluation_batches(batch_size, workers, limit):
            x = normalize(images.to(device, non_blocking=True)).contiguous(memory_format=memory_format)
            with autocast(device, precision):
                logits = model(x)
            scores.append(logits.float().softmax(1).cpu())
            labels.append(batch_labels)
            bar.update(bar.position + len(batch_labels))
    finally:
        model.train(was_training)
        bar.close()
    return torch.cat(scores), torch.cat(labels)


def images_progress(data: ArrayDataset | FolderDataset, limit: int | None, label: str | None) -> Progress:
    """A progress line over the images an evaluation reads (shown only with a label)."""
    total = len(data) if limit is None else min(limit, len(data))
    return Progress(total, label or "", enabled=label is not None)


@torch.no_grad()
def mode_probabilities(model: nn.Module, data: ArrayDataset | FolderDataset, normalize: Normalize,
                       mode: str = "center", *, device: torch.device, padding: int = 4, batch_size: int = 500,
                       precision: Precision = "fp32", workers: int = 0, limit: int | None = None,
                       progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax scores (N, classes) in a testing `mode` (see the module docstring), and the labels.

    `padding` is the training padding of array images at 32x32 (the recipe's `padding`), used by ``10crop``.
    `batch_size` counts views: 10crop and multiscale take batch_size // 10 images at a time (multiscale's largest
    view has 8 times the pixels of a training crop). Any mode is computed as asked;
    `evaluate_checkpoints` refuses the modes that do not fit a net (module docstring).
    """
    check_mode(mode)
    if mode == "center":
        return class_probabilities(model, data, normalize, device=device, batch_size=batch_size,
                                   precision=precision, workers=workers, limit=limit, progress=progress)
    was_training = model.training
    model.eval()

    def softmax(x: torch.Tensor) -> torch.Tensor:
        with autocast(device, precision):
            return model(x).float().softmax(1)

    images_per_batch = max(1, batch_size // TEN_CROP_VIEWS)
    scores, labels = [], []
    bar = images_progress(data, limit, progress)
    try:
        for images, batch_labels in data.test_views(mode, images_per_batch, workers, limit, padding):
            images = images.to(device, non_blocking=True)
            if mode == "10crop":  # images: (10, N, C, crop, crop), all 10N views in one forward pass
                views = softmax(normalize(images.flatten(0, 1)))
                scores.append(views.unflatten(0, images.shape[:2]).mean(0).cpu())
            else:
                x = normalize(images)
                sides = multiscale_sides(training_side(normalize))
                scores.append(torch.stack([softmax(resize_shorter(x, side)) for side in sides]).mean(0).cpu())
            labels.append(batch_labels)
            bar.update(bar.position + len(batch_labels))
    finally:
        model.train(was_training)
        bar.close()
    return torch.cat(scores), torch.cat(labels)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r} is not a testing mode; choose one of {', '.join(MODES)}")


def check_multiscale_fits(normalize: Normalize, checkpoint: Path) -> None:
    """Refuse multi-scale testing of a net trained on small images, where the paper tests a single view."""
    side = training_side(normalize)
    if side <= LARGEST_SMALL_IMAGE:
        raise ValueError(f"--mode multiscale is the paper's ImageNet protocol; {checkpoint} was trained on "
                         f"{side}x{side} images, which the paper tests on the single view of the original image "
                         f"(multiscale took a MNIST net from 8.6% to 80.9% error): use --mode center")


def training_side(normalize: Normalize) -> int:
    """The side of the training inputs: that of the per-pixel mean (224 crops when the mean is per channel)."""
    side = normalize.mean.shape[-1]
    return side if side > 1 else PAPER_CROP


def multiscale_sides(train_side: int) -> list[int]:
    """The paper's multi-scale shorter sides, in proportion to the training input side (224 in the paper)."""
    return [round(side * train_side / PAPER_CROP) for side in PAPER_SCALES]


def top_k_error(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of images whose label is not among the k highest scores (k is capped at the number of classes)."""
    k = min(k, scores.shape[1])
    hits = (scores.topk(k, dim=1).indices == labels[:, None]).any(1)
    return 1.0 - hits.float().mean().item()


# --------------------------------------------------------------------------------------------------------------
# Checkpoints: evaluation, ensembles, prediction
# --------------------------------------------------------------------------------------------------------------


def load_models(checkpoints: Sequence[str | Path], device: torch.device,
                model_name: str | None = None) -> list[tuple[nn.Module, dict]]:
    """The models of an ensemble, on `device`; they must predict the same classes in the same order. With
    `model_name`, files of another project's weights are that model (checkpoint.load_model)."""
    if not checkpoints:
        raise ValueError("no checkpoint given")
    models = [load_model(path, model_name=model_name) for path in checkpoints]
    first_classes = models[0][1]["classes"]
    for path, (_, state) in zip(checkpoints[1:], models[1:]):
        if state["classes"] != first_classes:
            raise ValueError(f"cannot ensemble {checkpoint_path(checkpoints[0])} and {checkpoint_path(path)}: they "
                             f"predict different classes ({len(first_classes)} vs {len(state['classes'])}: "
                             f"{first_classes[:3]}... vs {state['classes'][:3]}...)")
    return [(model.to(device), state) for model, state in models]


def ensemble_probabilities(models: Sequence[tuple[nn.Module, dict]], data: ArrayDataset | FolderDataset,
                           mode: str = "center", *, device: torch.device, batch_size: int = 500,
                           precision: Precision = "fp32", workers: int = 0,
                           progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax scores of `data` averaged over the (model, checkpoint) pairs of `load_models` (one: its own
    scores), each with its own normalization and training padding; and the labels. With `progress`, a progress
    line per model."""
    scores, labels = [], None
    for number, (model, state) in enumerate(models, start=1):
        recipe = state.get("config", {}).get("recipe", {})
        label = f"{mode} {number}/{len(models)}" if progress else None
        model_scores, labels = mode_probabilities(
            model, data, Normalize.from_state_dict(state["normalize"]), mode, device=device,
            padding=recipe.get("padding", 4), batch_size=batch_size, precision=precision, workers=workers,
            progress=label)
        scores.append(model_scores)
    return torch.stack(scores).mean(0), labels


def evaluate_checkpoints(checkpoints: Sequence[str | Path], data: str | None = None, mode: str = "center", *,
                         device: str = "auto", batch_size: int = 500, workers: int = 0, precision: str = "fp32",
                         calibration_data: str | None = None, model_name: str | None = None,
                         progress: bool = False) -> dict:
    """Top-1/top-5 error on the test split of `data` (default: the dataset the first checkpoint was trained on),
    its images seen at the resolution the checkpoints were trained at. `model_name`: the model that files of another
    project's weights hold (they record no dataset: give `data`).

    `precision`: fp32 (the model as trained), bf16 (autocast), int8 (`quantize`: each checkpoint calibrated on
    the training split of `calibration_data`, by default its own run's dataset), or auto (`resolve_precision`)."""
    check_mode(mode)  # before loading anything
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    target = inference_device(device, precision)
    precision = resolve_precision(precision, target, training=False)
    models = load_models(checkpoints, target, model_name)
    if mode == "multiscale":  # refused before any data is read
        for path, (_, state) in zip(checkpoints, models):
            check_multiscale_fits(Normalize.from_state_dict(state["normalize"]), checkpoint_path(path))
    first = models[0][1]
    spec = data or first.get("config", {}).get("data")
    if not spec:
        raise ValueError(f"{checkpoint_path(checkpoints[0])} does not record its dataset; give --data")
    resolution = recorded_resolution(first)
    others = [checkpoint_path(path) for path, (_, state) in zip(checkpoints, models)
              if recorded_resolution(state) != resolution]
    if others:
        raise ValueError(f"cannot ensemble networks trained at other image resolutions: {others[0]} was not trained "
                         f"at {checkpoint_path(checkpoints[0])}'s --resolution {resolution:g}")
    splits = load_dataset(spec, resolution=resolution)
    if mode == "10crop" and not splits.flip:
        raise ValueError(f"--mode 10crop averages mirrored views, but {spec} is never mirrored in training (a "
                         f"mirrored digit is another glyph; a MNIST net errs on 71% of them): use --mode center")
    if splits.classes != first["classes"]:
        raise ValueError(f"{spec} has classes {splits.classes[:3]}... ({splits.num_classes}), but "
                         f"{checkpoint_path(checkpoints[0])} predicts {first['classes'][:3]}... "
                         f"({len(first['classes'])})")
    if precision == "int8":
        models = [(int8_inference(model, run_calibration_batch(state, calibration_data)), state)
                  for model, state in models]
    scores, labels = ensemble_probabilities(models, splits.test, mode, device=target, batch_size=batch_size,
                                            precision=precision, workers=workers, progress=progress)
    return {"checkpoints": [str(checkpoint_path(path)) for path in checkpoints], "data": spec, "mode": mode,
            "precision": precision, "images": len(labels), "top1_error": top_k_error(scores, labels, 1),
            "top5_error": top_k_error(scores, labels, 5)}


def prediction_input(path: str | Path, channels: int, side: int, border: float) -> torch.Tensor:
    """One image file as uint8 (channels, side, side): the central square, less `border` (a fraction of each
    side, as the 256 -> 224 validation crop removes), resized to `side`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as img:
            img = img.convert("L" if channels == 1 else "RGB")
    except (*PILLOW_DECODE_ERRORS, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from None
    square = ImageOps.fit(img, (side, side), Image.BILINEAR, bleed=border)
    pixels = torch.from_numpy(np.array(square))
    return pixels[None] if channels == 1 else pixels.permute(2, 0, 1)


class Prediction(NamedTuple):
    name: str  # what people call the class ("tench"), from the training folder's synsets.txt where it had one
    probability: float
    label: str  # the class as the data names it: a CIFAR class, a digit, a class folder ("n01440764")


@torch.no_grad()
def predict(checkpoint: str | Path, image_paths: Sequence[str | Path], k: int = 5, *,
            device: str = "auto", precision: str = "auto", calibration_data: str | None = None,
            model_name: str | None = None) -> list[list[Prediction]]:
    """The k most probable classes of each image, most probable first. `model_name`: the model that a file of
    another project's weights holds (checkpoint.load_model).

    Images are decoded with Pillow (grayscale for a 1-channel model) and brought to the training input size, which
    the checkpoint's per-pixel mean gives (224 when the mean is per channel); a model trained on an image folder
    sees its validation view (shorter side 256, central 224); a small-image model the central square resized.
    The model runs as `export.fast_inference`: BN folded, channels_last, and with precision "auto" bf16 only where
    the CPU has AMX (`precision.resolve_precision`); with "int8" as `quantize.int8_inference`, calibrated on the
    training split of `calibration_data` (default: the run's own dataset).
    """
    if k < 1:
        raise ValueError(f"--top must be >= 1, got {k}")
    target = inference_device(device, precision)
    precision = resolve_precision(precision, target, training=False)  # before any image is read
    model, state = load_model(checkpoint, model_name=model_name)
    normalize = Normalize.from_state_dict(state["normalize"])
    channels = state["model_kwargs"].get("in_channels", 3)
    side = training_side(normalize)
    spec = state.get("config", {}).get("data")
    validation = PAPER_SIZES  # the border the validation crop removes is the same fraction at any resolution
    border = (1 - validation.crop / validation.resize) / 2 if spec and DatasetSpec.parse(spec).kind == "folder" else 0.0
    images = torch.stack([prediction_input(path, channels, side, border) for path in image_paths])
    network = (int8_inference(model, run_calibration_batch(state, calibration_data)) if precision == "int8"
               else fast_inference(model.to(target), precision=precision))
    scores = network(normalize(images.to(target))).softmax(1).cpu()
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    names = state.get("class_names", state["classes"])
    return [[Prediction(names[i], p, state["classes"][i]) for i, p in zip(indices.tolist(), probs.tolist())]
            for indices, probs in zip(top.indices, top.values)]
