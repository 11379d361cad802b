"""Inference throughput of resnet50 at 224x224, batch 16, and batch-1 latency: eager fp32, the fast path, int8, and
ONNX Runtime, plus torch's own int8 (PT2E) for the choice of int8 library.

One `resnetlab bench infer` measurement (reference, fast path, `--precision int8` on ONNX Runtime, ONNX Runtime
fp32) with one more row where torchao is installed: PT2E static quantization with the X86InductorQuantizer
(per-channel int8 weights, uint8 activations, the same recipe as the ONNX Runtime path), compiled by Inductor with
weight freezing, calibrated on the same number of synthetic images. The X86InductorQuantizer refuses a ReLU module
called twice in one block, as torchvision's blocks and ours call `self.relu` ("Input partition has more than one
output node"), so that row's copy of the model calls the functional ReLU instead: the same computation. All rows
take turns in 3 rounds in the same process.

    python benchmarks/infer_throughput.py --model resnet50 --batch-size 16 --seconds 60 [--compile] [--no-pt2e]
"""

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

from resnetlab.bench import bench_infer, format_table
from resnetlab.complexity import native_input_size
from resnetlab.models import model_family
from resnetlab.quantize import CALIBRATION_IMAGES


class FunctionalReLU(nn.Module):
    """A ReLU whose every call is its own node for the quantizer's pattern matching."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x)


def pt2e_int8_path(model_name: str):
    def paths(model: torch.nn.Module) -> dict:
        try:
            from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
            from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as x86
        except ImportError:
            print("torchao is not installed: no PT2E row")
            return {}
        import torch._inductor.config

        input_size = native_input_size(model_family(model_name))
        calibration = torch.randn(CALIBRATION_IMAGES // 4, *input_size, generator=torch.Generator().manual_seed(0))
        model = copy.deepcopy(model).eval()
        for block in list(model.modules()):
            if isinstance(getattr(block, "relu", None), nn.ReLU):
                block.relu = FunctionalReLU()
        exported = torch.export.export(model, (calibration[:2],), dynamic_shapes=({0: torch.export.Dim.AUTO},)).module()
        quantizer = x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        with torch.no_grad():
            for batch in calibration.split(16):
                prepared(batch)
        torch._inductor.config.freezing = True
        compiled = torch.compile(convert_pt2e(prepared))
        with torch.no_grad():
            compiled(calibration[:16])  # compiles here, not in the first timed round
        return {"torch PT2E int8 (torchao X86InductorQuantizer, compiled, frozen)": compiled}
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=60.0, help="time per path, over 3 rounds")
    parser.add_argument("--compile", action="store_true", help="torch.compile the fast path")
    parser.add_argument("--no-pt2e", action="store_true", help="leave out the torchao PT2E row")
    args = parser.parse_args()
    summary = bench_infer(args.model, args.batch_size, args.seconds, compile=args.compile,
                          more_paths=None if args.no_pt2e else pt2e_int8_path(args.model))
    print(format_table(summary))


if __name__ == "__main__":
    main()
