"""Evaluation: class scores of a dataset in the paper's three testing modes, top-k error, and ensembles.

Modes (He et al. 2015, Sec. 3.4 and Table 3):

- ``center``: each image once, as seen during validation (array images as they are; folder images resized to 256
  on the shorter side and center-cropped to 224).
- ``10crop``: the four corner crops, the center crop and the horizontal flips of all five; softmax scores are
  averaged. The crops are of the training input size, taken from the image the training crops were taken from:
  folder images resized to 256 on the shorter side (224 crops); small array images (CIFAR, MNIST, digits)
  zero-padded as in training (4 pixels at 32x32, `padding_for`), so the 10 crops are the extreme and central
  positions of the training's random crop. Data never mirrored in training (MNIST, digits: a mirrored digit is
  another glyph) is refused it: the mirrored views are wrong (docs/benchmarks.md, section 6, measures how wrong).
- ``multiscale``: fully convolutional (the global average pool accepts any size): the shorter side is resized to
  each of the paper's scales {224, 256, 384, 480, 640} (for 224 training crops; other training sizes in the same
  ratios) and the softmax scores are averaged. Images are normalized at their loaded size (the per-pixel mean fits
  there) and the normalized batch is resized; resizing is linear, so this equals subtracting the equally resized
  mean. The paper tests multi-scale on ImageNet only and its CIFAR nets on "the single view of the original 32x32
  image"; on small images the mode is worse, not better (far worse for a MNIST net: section 6 of
  docs/benchmarks.md), so nets trained on whole images of at most 64x64 are refused it; nets trained on crops of
  image folders keep it at every --resolution.

`inference.evaluate_checkpoints` makes these refusals; `mode_probabilities` computes any mode it is asked for.
Measurements: docs/benchmarks.md, section 6.

The views of a batch go through the network together: 10crop's 10 crops of batch_size // 10 images as one batch
of views, multiscale's images at each scale as one batch.

An ensemble averages the softmax scores of several checkpoints, each with its own normalization.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from resnetlab.checkpoint import checkpoint_path
from resnetlab.data.augment import Normalize, resize_shorter
from resnetlab.data.datasets import ImageDataset
from resnetlab.factory import load_model
from resnetlab.precision import Precision, autocast
from resnetlab.progress import Progress
from resnetlab.recipes import trained_on_image_folder

MODES = ("center", "10crop", "multiscale")
# The paper's multi-scale testing: shorter sides relative to its 224 training crops.
PAPER_SCALES = (224, 256, 384, 480, 640)
PAPER_CROP = 224
# Nets trained on images this small (CIFAR and padded MNIST 32, digits 8) are tested on the single original view.
LARGEST_SMALL_IMAGE = 64
TEN_CROP_VIEWS = 10


@torch.no_grad()
def class_probabilities(model: nn.Module, data: ImageDataset, normalize: Normalize, *,
                        device: torch.device, batch_size: int = 500, precision: Precision = "fp32",
                        memory_format: torch.memory_format = torch.contiguous_format, workers: int = 0,
                        limit: int | None = None, progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax scores (N, classes) of the un-augmented images, in eval mode, and their labels. With `progress`, a
    progress line of that label counts the images."""
    def score(images: torch.Tensor) -> torch.Tensor:
        return softmax_scores(model, normalize(images).contiguous(memory_format=memory_format), device, precision)

    return score_batches(model, data.evaluation_batches(batch_size, workers, limit), score, device,
                         images_progress(data, limit, progress))


def softmax_scores(model: nn.Module, x: torch.Tensor, device: torch.device, precision: Precision) -> torch.Tensor:
    with autocast(device, precision):
        return model(x).float().softmax(1)


def score_batches(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                  score: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                  bar: Progress) -> tuple[torch.Tensor, torch.Tensor]:
    """`score` of every batch of images (moved to `device`) with the model in eval mode, and the labels; the
    model's mode is restored and the progress line closed however the loop ends."""
    was_training = model.training
    model.eval()
    scores, labels = [], []
    try:
        for images, batch_labels in batches:
            scores.append(score(images.to(device, non_blocking=True)).cpu())
            labels.append(batch_labels)
            bar.update(bar.position + len(batch_labels))
    finally:
        model.train(was_training)
        bar.close()
    return torch.cat(scores), torch.cat(labels)


def images_progress(data: ImageDataset, limit: int | None, label: str | None) -> Progress:
    """A progress line over the images an evaluation reads (shown only with a label)."""
    total = len(data) if limit is None else min(limit, len(data))
    return Progress(total, label or "", enabled=label is not None)


@torch.no_grad()
def mode_probabilities(model: nn.Module, data: ImageDataset, normalize: Normalize,
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
    sides = multiscale_sides(training_side(normalize))

    def score(images: torch.Tensor) -> torch.Tensor:
        if mode == "10crop":  # images: (10, N, C, crop, crop), all 10N views in one forward pass
            views = softmax_scores(model, normalize(images.flatten(0, 1)), device, precision)
            return views.unflatten(0, images.shape[:2]).mean(0)
        x = normalize(images)
        return torch.stack([softmax_scores(model, resize_shorter(x, side), device, precision)
                            for side in sides]).mean(0)

    views = data.test_views(mode, max(1, batch_size // TEN_CROP_VIEWS), workers, limit, padding)
    return score_batches(model, views, score, device, images_progress(data, limit, progress))


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"--mode {mode!r} is not a testing mode; choose one of {', '.join(MODES)}")


def check_multiscale_fits(state: dict, checkpoint: Path) -> None:
    """Refuse multi-scale testing of a net trained on whole small images (CIFAR, MNIST, digits), which the paper
    tests on a single view. Nets trained on crops of rescaled photographs (image folders, at any --resolution) keep
    it; files without a recorded dataset (another project's weights) are judged by their training image size."""
    if trained_on_image_folder(state):
        return
    side = training_side(Normalize.from_state_dict(state["normalize"]))
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
# Ensembles of checkpoints
# --------------------------------------------------------------------------------------------------------------


def load_models(checkpoints: Sequence[str | Path], device: torch.device,
                model_name: str | None = None) -> list[tuple[nn.Module, dict]]:
    """The models of an ensemble, on `device`; they must predict the same classes in the same order. With
    `model_name`, files of another project's weights are that model (factory.load_model)."""
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


def ensemble_probabilities(models: Sequence[tuple[nn.Module, dict]], data: ImageDataset,
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
