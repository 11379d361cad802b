"""Throughput of the project's default training and inference paths beside a reference measured in the same run.

    resnetlab bench train --model resnet20 --seconds 30
    resnetlab bench infer --model resnet50 --batch-size 16 --seconds 30 --json

Training reference: how popular CIFAR reproductions run: fp32, NCHW, eager, each image augmented on its own
(pad 4, random 32x32 crop, random flip, to float, normalize) in DataLoader workers. The project's path is what
`resnetlab train` does by default (TrainConfig's precision and layout, whole-batch uint8 augmentation); bf16 is
added as a row where the CPU has it and the default is fp32. Inference reference: fp32, NCHW, eager; the
project's path is `export.fast_inference`; beside them, where ONNX Runtime is installed, the int8 path of
`--precision int8` (`quantize`, calibrated here on synthetic images) and ONNX Runtime running the same fp32
network. All paths see synthetic data of the real shape (speed does not depend on the pixel values). The paths
take turns in rounds, so a machine shared with other work slows all of them alike; images/s is the median over
rounds, with the min and max beside it.

Achieved GFLOP/s counts 2 FLOPs per multiply-add of the convs and the fc (paper's MACs, `complexity`): forward
only for inference, 3x the forward for a training step (forward, grad of the input, grad of the weights). The
roof is the faster of a 4096x4096 fp32 and bf16 matmul measured in the same run (fp32 unless the CPU has AMX); an
int8 path can pass it, which is the point of int8.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F

from resnetlab.complexity import complexity, native_input_size
from resnetlab.data.augment import Normalize
from resnetlab.data.batches import array_batches
from resnetlab.data.datasets import ArrayDataset
from resnetlab.export import fast_inference, fold_batchnorm, write_onnx
from resnetlab.factory import create_model
from resnetlab.models import model_family
from resnetlab.precision import Precision, cpu_has_bf16, memory_format, resolve_precision
from resnetlab.recipes import RECIPES, TrainConfig, check_positive_int
from resnetlab.train import training_step

SYNTHETIC_IMAGES = 2048
INT8_PATH = "resnetlab --precision int8 (ONNX Runtime static int8)"  # the row --json also gives as "int8"
NUM_CLASSES = 10
ROUNDS = 3


@dataclass
class PathResult:
    name: str
    seconds_per_round: list[float] = field(default_factory=list)
    images_per_round: list[int] = field(default_factory=list)

    def rates(self) -> list[float]:
        return [n / s for n, s in zip(self.images_per_round, self.seconds_per_round)]

    def summary(self, flops_per_image: float) -> dict:
        rates = self.rates()
        median = statistics.median(rates)
        return {"path": self.name, "images_per_second": median, "min": min(rates), "max": max(rates),
                "gflops": median * flops_per_image / 1e9}


def check_settings(batch_size: int, seconds: float) -> None:
    check_positive_int("batch_size", batch_size)
    if not seconds > 0:
        raise ValueError(f"--seconds must be > 0, got {seconds!r}")


def matmul_roof(dtype: torch.dtype, size: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of the best of `repeats` size x size matmuls in `dtype`: the machine's practical compute ceiling."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up: oneDNN picks and caches its kernel
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def timed(work: Callable[[], object]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def take_turns(steps: dict[str, Callable[[], int]], seconds: float, warmup_steps: int = 2) -> list[PathResult]:
    """Run each path's step (which returns the images it processed) for seconds/ROUNDS per round, in turn."""
    for step in steps.values():
        for _ in range(warmup_steps):
            step()
    results = {name: PathResult(name) for name in steps}
    for _ in range(ROUNDS):
        for name, step in steps.items():
            images, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / ROUNDS or images == 0:
                images += step()
            results[name].seconds_per_round.append(time.perf_counter() - start)
            results[name].images_per_round.append(images)
    return list(results.values())


# -------------------------------------------------------------------------------------------------------------
# Training


class PerImageAugment(torch.utils.data.Dataset):
    """The reference data pipeline: one image at a time, as torchvision transforms do in CIFAR repositories."""

    def __init__(self, data: ArrayDataset, padding: int = 4):
        self.data, self.padding = data, padding
        self.mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
        self.std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.data.images[index]
        _, h, w = image.shape
        padded = F.pad(image, (self.padding,) * 4)
        top, left = torch.randint(0, 2 * self.padding + 1, (2,)).tolist()
        image = padded[:, top:top + h, left:left + w]
        if torch.rand(()) < 0.5:
            image = image.flip(2)
        return (image.float() / 255 - self.mean) / self.std, self.data.labels[index]


def endless(loader: torch.utils.data.DataLoader) -> Iterator:
    while True:
        yield from loader


def synthetic_dataset(image_shape: tuple[int, int, int], size: int = SYNTHETIC_IMAGES) -> ArrayDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size, *image_shape), dtype=torch.uint8, generator=generator)
    return ArrayDataset(images, torch.randint(0, NUM_CLASSES, (size,), generator=generator))


def next_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: Iterator, *, precision: Precision,
              layout: torch.memory_format, normalize: Normalize | None = None) -> int:
    """resnetlab.train's step on the next batch (normalize is None when the batches come normalized); returns
    the batch size once the step has finished (the returned loss is read, as a log point would)."""
    images, labels = next(batches)
    x = (normalize(images) if normalize else images).contiguous(memory_format=layout)
    training_step(model, optimizer, x, labels, device=torch.device("cpu"), precision=precision).tolist()
    return len(labels)


def train_paths(model_name: str, batch_size: int, *, plain_bf16: bool = False) -> dict[str, Callable[[], int]]:
    """name -> step. `plain_bf16` adds the bf16 path with a bf16 residual stream (ResNet.fp32_residual_stream)."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    recipe = RECIPES["cifar"]
    data = synthetic_dataset(native_input_size(model_family(model_name)), max(SYNTHETIC_IMAGES, 2 * batch_size))

    def make_step(precision: Precision, channels_last: bool, reference: bool,
                  fp32_residual_stream: bool = True) -> Callable[[], int]:
        torch.manual_seed(0)
        layout = memory_format(channels_last)
        model = create_model(model_name, num_classes=NUM_CLASSES).to(memory_format=layout).train()
        model.fp32_residual_stream = fp32_residual_stream
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=recipe.momentum,
                                    weight_decay=recipe.weight_decay)
        if reference:
            loader = torch.utils.data.DataLoader(PerImageAugment(data), batch_size=batch_size, shuffle=True,
                                                 num_workers=2, drop_last=True, persistent_workers=True)
            batches, normalize = endless(loader), None
        else:
            batches = array_batches(data.images, data.labels, batch_size=batch_size, seed=0, start=0, stop=2**62,
                                    padding=recipe.padding, flip=True)
            normalize = Normalize.fit(data.images)
        return lambda: next_step(model, optimizer, batches, precision=precision, layout=layout,
                                  normalize=normalize)

    paths = {"reference (fp32, NCHW, per-image DataLoader)": make_step("fp32", False, reference=True),
             f"resnetlab default ({defaults['precision']}, "
             f"{'channels_last' if defaults['channels_last'] else 'NCHW'})":
                 make_step(defaults["precision"], defaults["channels_last"], reference=False)}
    if defaults["precision"] == "fp32" and cpu_has_bf16():
        paths["resnetlab --precision bf16 (channels_last)"] = make_step("bf16", True, reference=False)
    if plain_bf16:
        paths["resnetlab bf16, bf16 residual stream (plain autocast)"] = make_step(
            "bf16", True, reference=False, fp32_residual_stream=False)
    return paths


def bench_train(model_name: str, batch_size: int = 128, seconds: float = 30.0, *, plain_bf16: bool = False) -> dict:
    """`plain_bf16`: also the bf16 path with a bf16 residual stream, to show what the fp32 stream costs."""
    check_settings(batch_size, seconds)
    model = create_model(model_name, num_classes=NUM_CLASSES)
    macs = complexity(model, native_input_size(model_family(model_name))).macs
    results = take_turns(train_paths(model_name, batch_size, plain_bf16=plain_bf16), seconds)
    return report("train", model_name, batch_size, results, flops_per_image=3 * 2 * macs)


# -------------------------------------------------------------------------------------------------------------
# Inference


def onnx_runtime_paths(model: torch.nn.Module, input_size: tuple[int, int, int]
                       ) -> dict[str, Callable[[torch.Tensor], object]]:
    """The int8 path and ONNX Runtime on the fp32 network (BN folded), or none without ONNX Runtime."""
    try:
        import onnxruntime
    except ImportError:
        return {}
    from resnetlab.quantize import CALIBRATION_IMAGES, OnnxRuntimeNetwork, int8_inference

    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "fp32.onnx"
        write_onnx(fold_batchnorm(model), torch.zeros(2, *input_size), path)
        fp32 = OnnxRuntimeNetwork(path.read_bytes())
    calibration = torch.randn(CALIBRATION_IMAGES // 4, *input_size, generator=torch.Generator().manual_seed(0))
    return {INT8_PATH: int8_inference(model, calibration),
            f"ONNX Runtime {onnxruntime.__version__} (BN folded, fp32)": fp32}


def bench_infer(model_name: str, batch_size: int = 16, seconds: float = 30.0, compile: bool = False,
                more_paths: Callable[[torch.nn.Module], dict[str, Callable[[torch.Tensor], object]]] | None = None
                ) -> dict:
    """`more_paths(model)` may add rows measured in the same run (name -> function of an fp32 NCHW batch)."""
    check_settings(batch_size, seconds)
    torch.manual_seed(0)
    model = create_model(model_name).eval()
    input_size = native_input_size(model_family(model_name))
    macs = complexity(model, input_size).macs
    precision = resolve_precision("auto", torch.device("cpu"), training=False)
    fast = fast_inference(model, precision=precision, compile=compile)
    paths = {"reference (fp32, NCHW, eager)": model,
             f"resnetlab fast path (BN folded, channels_last, {precision}{', compiled' if compile else ''})": fast,
             **onnx_runtime_paths(model, input_size), **(more_paths(model) if more_paths else {})}
    batch, single = torch.randn(batch_size, *input_size), torch.randn(1, *input_size)

    def step(network: Callable[[torch.Tensor], object], x: torch.Tensor) -> Callable[[], int]:
        def run() -> int:
            network(x)
            return len(x)
        return run

    with torch.inference_mode():
        results = take_turns({name: step(network, batch) for name, network in paths.items()}, seconds)
        latency = take_turns({name: step(network, single) for name, network in paths.items()}, seconds / 3)
    summary = report("infer", model_name, batch_size, results, flops_per_image=2 * macs)
    for row, timing in zip(summary["paths"], latency):
        row["batch1_latency_ms"] = 1000 / statistics.median(timing.rates())
    return summary


def report(kind: str, model_name: str, batch_size: int, results: list[PathResult], flops_per_image: float) -> dict:
    roofs = {"fp32_roof_gflops": matmul_roof(torch.float32), "bf16_roof_gflops": matmul_roof(torch.bfloat16)}
    rows = [result.summary(flops_per_image) for result in results]
    for row in rows:
        row["vs_reference"] = row["images_per_second"] / rows[0]["images_per_second"]
        row["fraction_of_roof"] = row["gflops"] / max(roofs.values())
    summary = {"kind": kind, "model": model_name, "batch_size": batch_size, "threads": torch.get_num_threads(),
               "torch": torch.__version__, **roofs, "paths": rows, "reference": rows[0], "default": rows[1]}
    int8 = [row for row in rows if row["path"] == INT8_PATH]
    return {**summary, "int8": int8[0]} if int8 else summary


def format_table(summary: dict) -> str:
    lines = [f"{summary['kind']} {summary['model']}, batch {summary['batch_size']}, {summary['threads']} threads, "
             f"torch {summary['torch']}; matmul roofs: fp32 {summary['fp32_roof_gflops']:.0f}, bf16 "
             f"{summary['bf16_roof_gflops']:.0f} GFLOP/s (% roof: of the faster)",
             f"{'path':<62} {'images/s':>9} {'(min-max)':>13} {'x ref':>6} {'GFLOP/s':>8} {'% roof':>7}"
             + (f" {'batch-1 ms':>10}" if summary["kind"] == "infer" else "")]
    for row in summary["paths"]:
        spread = f"({row['min']:.0f}-{row['max']:.0f})"
        line = (f"{row['path']:<62} {row['images_per_second']:>9.1f} {spread:>13} {row['vs_reference']:>6.2f} "
                f"{row['gflops']:>8.1f} {100 * row['fraction_of_roof']:>6.1f}%")
        if "batch1_latency_ms" in row:
            line += f" {row['batch1_latency_ms']:>10.1f}"
        lines.append(line)
    return "\n".join(lines)
