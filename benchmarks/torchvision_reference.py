"""Reference CPU inference throughput of torchvision's own ResNets, to compare resnetlab's numbers against.

Eager fp32, NCHW (contiguous), batch 16 at 224x224, 2 threads, random weights (speed does not depend on them):
2 warm-up runs, then the median images/s over 5 timed runs. Needs a venv with torchvision, e.g.
    python3 -m venv /work/tvvenv && /work/tvvenv/bin/pip install torch==2.14.1 torchvision==0.29.1
    /work/tvvenv/bin/python benchmarks/torchvision_reference.py
"""

import statistics
import time

import torch
import torchvision

MODEL_NAMES = ("resnet18", "resnet50")
BATCH_SIZE = 16
IMAGE_SIZE = 224
THREADS = 2
WARMUP_RUNS = 2
TIMED_RUNS = 5


def images_per_second(name: str) -> float:
    model = getattr(torchvision.models, name)(weights=None).eval()
    batch = torch.randn(BATCH_SIZE, 3, IMAGE_SIZE, IMAGE_SIZE)
    seconds = []
    with torch.inference_mode():
        for run in range(WARMUP_RUNS + TIMED_RUNS):
            start = time.perf_counter()
            model(batch)
            if run >= WARMUP_RUNS:
                seconds.append(time.perf_counter() - start)
    return BATCH_SIZE / statistics.median(seconds)


def main() -> None:
    torch.set_num_threads(THREADS)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {THREADS} threads, "
          f"eager fp32 NCHW, batch {BATCH_SIZE}, {IMAGE_SIZE}x{IMAGE_SIZE}, "
          f"median of {TIMED_RUNS} runs after {WARMUP_RUNS} warm-ups")
    print(f"{'model':<10} {'images/s':>9}")
    for name in MODEL_NAMES:
        print(f"{name:<10} {images_per_second(name):>9.1f}")


if __name__ == "__main__":
    main()
