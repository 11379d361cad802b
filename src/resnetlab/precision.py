"""Where the computation runs and in what number format: the device, the precision, the memory layout.

A precision is one of the strings below, the same everywhere: `train --precision`, `predict --precision`,
TrainConfig.precision (stored as that string in checkpoints and summary.json), `export.fast_inference`, `bench`.
`resolve_precision` is the one place that checks a name and decides what it means on a device.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Literal

import torch

# What a computation runs in: float32, bf16 autocast (convs and the fc), or, for inference on the CPU only, int8
# (ONNX Runtime's static quantization, resnetlab.quantize).
Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[Precision, ...] = ("fp32", "bf16")  # training's choices, its default first
# Inference may also ask for "auto", predict's default: bf16 where it is measured faster than fp32, else fp32.
INFERENCE_PRECISIONS = ("auto", "bf16", "fp32", "int8")
EXPORT_PRECISIONS = ("fp32", "int8")  # what `resnetlab export` writes: the fp32 network, or its int8 form
# Measured (docs/benchmarks.md, section 1: benchmarks/emulated_bf16.py); the warning quotes it.
EMULATED_BF16_SLOWDOWN = "ResNet-20 training: 13x slower on an AVX2-only AMD EPYC"
CPUINFO = Path("/proc/cpuinfo")  # the CPU's feature flags (Linux); `bf16_is_faster` looks for AMX there


def check_precision(name: object, *, training: bool) -> None:
    """Reject a name that is not a precision, before any work (a config is checked before its device is known)."""
    choices = PRECISIONS if training else INFERENCE_PRECISIONS
    if name in choices:
        return
    # A run's settings are named as their command-line flags, as every other rejected setting is (recipes.validate);
    # inference takes the precision as the keyword argument of predict and fast_inference.
    if training:
        raise ValueError(f"--precision {name!r} is not valid; choose one of {', '.join(choices)}")
    raise ValueError(f"precision={name!r} is not valid; choose {', '.join(choices[:-1])} or {choices[-1]}")


def resolve_precision(name: str, device: torch.device, *, training: bool) -> Precision:
    """The precision `name` runs as on `device`. "auto" (inference only) is bf16 on CPUs with AMX, the one place
    bf16 measured faster (docs/benchmarks.md), and fp32 elsewhere, GPUs included: there it is unmeasured, and fp32
    is exact. bf16 on a GPU without bf16 support is refused here rather than failing inside autocast."""
    check_precision(name, training=training)
    if name == "auto":
        return "bf16" if device.type == "cpu" and bf16_is_faster() else "fp32"
    if name == "int8" and device.type != "cpu":
        raise ValueError(f"--precision int8 runs on the CPU (ONNX Runtime), not on {device}: use --device cpu")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"--precision bf16 needs a GPU with bf16 (Ampere or newer); {device} has none: use fp32")
    if name == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        # Allowed (the numbers are bf16's everywhere), but a user should not wait hours to learn it was emulated.
        warnings.warn("bf16 was asked for, but this CPU has no native bf16 (AVX512-BF16 or AMX), so it is emulated: "
                      f"expect it far slower than fp32 ({EMULATED_BF16_SLOWDOWN}, docs/benchmarks.md)",
                      RuntimeWarning, stacklevel=2)
    return name


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when present, else the CPU; asking for CUDA without it is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def inference_device(name: str, precision: str) -> torch.device:
    """`pick_device` for inference: "auto" is the CPU for int8, which runs there only (ONNX Runtime)."""
    return pick_device("cpu" if name == "auto" and precision == "int8" else name)


def autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager:
    """bf16 autocast for the convolutions and the fc; a no-op otherwise (int8 networks quantize themselves)."""
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 convolutions natively (oneDNN on AVX512-BF16 or AMX); elsewhere bf16 is
    emulated and slower than fp32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_is_faster() -> bool:
    """Whether bf16 should be the fast path on this CPU: only with AMX tiles. With AVX512-BF16 alone, oneDNN's bf16
    kernels were slower than fp32 for training and inference on an Intel Xeon, and faster for training on an AMD
    EPYC (docs/benchmarks.md, section 1); inference there is unmeasured, so the rule stays AMX-only until it is."""
    return cpu_has_bf16() and CPUINFO.is_file() and "amx_bf16" in CPUINFO.read_text()


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
