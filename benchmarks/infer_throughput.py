"""Inference throughput of resnet50 at 224x224, batch 16, and batch-1 latency, beside eager fp32 and ONNX Runtime.

One `resnetlab bench infer` measurement with an extra row: the same model, BN folded, exported to ONNX (fp32)
and run by ONNX Runtime's CPU provider with default session options. ONNX Runtime is an optional benchmark
dependency: without it the row is left out. All rows take turns in 3 rounds in the same process.

    python benchmarks/infer_throughput.py --model resnet50 --batch-size 16 --seconds 60 [--compile]
"""

import argparse
import tempfile
from pathlib import Path

import torch

from resnetlab.bench import bench_infer, format_table
from resnetlab.export import fold_batchnorm


def onnx_runtime_path(directory: Path):
    def paths(model: torch.nn.Module) -> dict:
        try:
            import onnxruntime
        except ImportError:
            print("onnxruntime is not installed: no ONNX Runtime row")
            return {}
        path = directory / "model.onnx"
        torch.onnx.export(fold_batchnorm(model), (torch.zeros(1, 3, 224, 224),), str(path), input_names=["images"],
                          dynamic_axes={"images": {0: "batch"}}, dynamo=False)
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return {f"ONNX Runtime {onnxruntime.__version__} (BN folded, fp32)":
                lambda x: session.run(None, {"images": x.numpy()})}
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0, help="time per path, over 3 rounds")
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        summary = bench_infer(args.model, args.batch_size, args.seconds, compile=args.compile,
                              more_paths=onnx_runtime_path(Path(directory)))
    print(format_table(summary))


if __name__ == "__main__":
    main()
