"""Where the computation runs and in what number format: the device, bf16 autocast, the memory layout."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch


def pick_device(name: str = "auto") -> torch.device:
    """'auto' is CUDA when present, else the CPU; asking for CUDA without it is an error, not a silent fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast for the convolutions and the fc; a no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 convolutions natively (oneDNN on AVX512-BF16 or AMX); elsewhere bf16 is
    emulated and slower than fp32."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bf16_is_faster() -> bool:
    """Whether bf16 should be the fast path: only with AMX tiles. With AVX512-BF16 alone, oneDNN's bf16 kernels
    measured 0.83-0.96x fp32 for training and inference (docs/benchmarks.md, section 0)."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpu_has_bf16() and cpuinfo.is_file() and "amx_bf16" in cpuinfo.read_text()


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
