"""The commands that use a trained checkpoint: evaluate it (or an ensemble), predict the classes of image files,
and export it; each is a function a user can call from Python, and the CLI calls them.

    resnetlab evaluate runs/x --mode 10crop
    resnetlab predict runs/x photo.jpg --precision int8
    resnetlab export runs/x --format onnx --out resnet20.onnx

They put together the building blocks below them: `evaluate` (class scores, test views, top-k, ensembles),
`export` (BN folding, the fast inference path, ONNX writing) and `quantize` (int8 on ONNX Runtime), which training
never needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from resnetlab.checkpoint import checkpoint_path
from resnetlab.complexity import native_input_size
from resnetlab.data.augment import PAPER_SIZES, Normalize
from resnetlab.data.datasets import PILLOW_DECODE_ERRORS
from resnetlab.data.spec import load_dataset
from resnetlab.evaluate import (
    check_mode,
    check_multiscale_fits,
    ensemble_probabilities,
    load_models,
    top_k_error,
    training_side,
)
from resnetlab.export import fast_inference, fold_batchnorm, write_onnx
from resnetlab.factory import load_model
from resnetlab.files import write_atomically
from resnetlab.models import model_family
from resnetlab.precision import EXPORT_PRECISIONS, inference_device, resolve_precision
from resnetlab.quantize import int8_inference, quantized_onnx, run_calibration_batch
from resnetlab.recipes import recorded_data, recorded_resolution, trained_on_image_folder

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}


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
            check_multiscale_fits(state, checkpoint_path(path))
    first = models[0][1]
    spec = data or recorded_data(first)
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
    another project's weights holds (factory.load_model).

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
    validation = PAPER_SIZES  # the border the validation crop removes is the same fraction at any resolution
    border = (1 - validation.crop / validation.resize) / 2 if trained_on_image_folder(state) else 0.0
    images = torch.stack([prediction_input(path, channels, side, border) for path in image_paths])
    network = (int8_inference(model, run_calibration_batch(state, calibration_data)) if precision == "int8"
               else fast_inference(model.to(target), precision=precision))
    scores = network(normalize(images.to(target))).softmax(1).cpu()
    top = scores.topk(min(k, scores.shape[1]), dim=1)
    names = state.get("class_names", state["classes"])
    return [[Prediction(names[i], p, state["classes"][i]) for i, p in zip(indices.tolist(), probs.tolist())]
            for indices, probs in zip(top.indices, top.values)]


def export(checkpoint: str | Path, format: str, out: str | Path | None = None, *, precision: str = "fp32",
           calibration_data: str | None = None) -> Path:
    """Write the checkpoint's model, BN folded, as ONNX or TorchScript; returns the file written.

    precision "int8" (ONNX only) writes the int8 model of `quantize.quantized_onnx`, calibrated on the training
    split of `calibration_data` (default: the run's own dataset). `out` defaults to model.onnx /
    model.int8.onnx / model.torchscript.pt in a run directory, else the checkpoint's name with that suffix."""
    if format not in FORMATS:
        raise ValueError(f"--format {format!r} is not valid; choose one of {', '.join(FORMATS)}")
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"--precision {precision!r} is not valid for export; choose {' or '.join(EXPORT_PRECISIONS)}")
    if precision == "int8" and format != "onnx":
        raise ValueError("--precision int8 is exported as ONNX only (ONNX Runtime runs it): use --format onnx")
    model, state = load_model(checkpoint)
    path = Path(out) if out is not None else default_export_path(Path(checkpoint), format, precision)
    if precision == "int8":
        onnx_model = quantized_onnx(model, run_calibration_batch(state, calibration_data))
        write_atomically(path, lambda file: file.write(onnx_model))  # an existing file survives a failed export
        return path
    folded = fold_batchnorm(model)
    example = torch.zeros(2, *native_input_size(model_family(state["model_name"]), state["model_kwargs"]
                                                .get("in_channels", 3)))
    with torch.no_grad():
        if format == "torchscript":
            torch.jit.save(torch.jit.trace(folded, example), str(path))
        else:
            write_onnx(folded, example, path)
    return path


def default_export_path(checkpoint: Path, format: str, precision: str = "fp32") -> Path:
    suffix = (".int8" if precision == "int8" else "") + SUFFIXES[format]
    return checkpoint / f"model{suffix}" if checkpoint.is_dir() else checkpoint.with_name(checkpoint.stem + suffix)
