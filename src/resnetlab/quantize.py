"""int8 inference: post-training static quantization with ONNX Runtime, calibrated on the run's own images.

    resnetlab predict runs/x photo.jpg --precision int8
    resnetlab evaluate runs/x --precision int8
    resnetlab export runs/x --format onnx --precision int8

The network, BN folded (`export.fold_batchnorm`), is exported to ONNX in fp32, and ONNX Runtime's `quantize_static`
turns it into an int8 one: weights per output channel (`weight_type`), activations per tensor (unsigned int8), their
ranges taken from the fp32 network's activations on `CALIBRATION_IMAGES` of the run's training images (evenly
spaced through the training set, in their validation view, normalized as in training). Every convolution is
int8 and the fc stays fp32 (0.05% of resnet50's work). Keeping the first convolution in fp32 too, a common choice,
kept the fp32 answer on a few more test images but cost much of the int8 speed (docs/benchmarks.md, section 2).
ONNX Runtime runs the convolutions as int8 dot products (AVX512-VNNI where the CPU has it); it ran resnet50 faster
than torch's own int8 (PT2E with Inductor), measured in the same section.

The result, an `OnnxRuntimeNetwork`, is a module that takes the normalized fp32 batch and returns fp32 logits, like
`export.fast_inference`, so predict and evaluate use it unchanged. It runs on the CPU only.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from resnetlab.data.augment import Normalize
from resnetlab.data.datasets import ImageDataset, evenly_spaced
from resnetlab.data.spec import load_dataset
from resnetlab.export import fold_batchnorm, write_onnx
from resnetlab.recipes import recorded_data, recorded_resolution

# Enough images for stable activation ranges (ONNX Runtime's MinMax calibration); more only costs time.
CALIBRATION_IMAGES = 256
INSTALL_HINT = "--precision int8 needs ONNX Runtime: pip install -e '.[int8]'"


def calibration_batch(data: ImageDataset, normalize: Normalize,
                      count: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """`count` images evenly spaced through `data`, in their validation view, normalized: float (N, C, H, W)."""
    if len(data) == 0:
        raise ValueError("cannot calibrate int8 on an empty dataset")
    spaced = data.subset(evenly_spaced(len(data), count))
    images = torch.cat([images for images, _ in spaced.evaluation_batches(250)])
    return normalize(images)


def run_calibration_batch(state: dict, data: str | None = None, count: int = CALIBRATION_IMAGES) -> torch.Tensor:
    """The calibration batch of a checkpoint: from the training split of `data`, by default the run's own dataset."""
    spec = data or recorded_data(state)
    if not spec:
        raise ValueError("--precision int8 calibrates on the run's training images, but the checkpoint does not "
                         "record its dataset: give --calibration-data SPEC")
    try:
        train = load_dataset(spec, resolution=recorded_resolution(state)).train
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--precision int8 calibrates on the training images of {spec}, which cannot be "
                                f"read ({error}); give --calibration-data SPEC") from None
    return calibration_batch(train, Normalize.from_state_dict(state["normalize"]), count)


def cpu_has_vnni() -> bool:
    return getattr(torch.cpu, "_is_vnni_supported", lambda: False)()


def weight_type():
    """Signed int8 weights where the CPU has AVX512-VNNI, unsigned elsewhere. Without VNNI, ONNX Runtime multiplies
    uint8 activations by int8 weights with VPMADDUBSW, whose 16-bit sums saturate: on an AVX2-only CPU a CIFAR-10
    ResNet-20's int8 answers agreed with its fp32 ones on 87.5% of the test images with int8 weights and on 97.9%
    with uint8 weights, which that CPU multiplies without saturating (ONNX Runtime's quantization guide names both
    remedies; 7-bit int8 weights, `reduce_range`, agreed on 96.9%). An exported int8 file keeps the weight type of
    the machine that wrote it."""
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if cpu_has_vnni() else QuantType.QUInt8


def quantized_onnx(model: nn.Module, calibration: torch.Tensor) -> bytes:
    """The int8 ONNX model (QDQ format) of `model`, BN folded, calibrated on the normalized batch `calibration`."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ImportError(INSTALL_HINT) from None

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration.split(32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch.contiguous().numpy()}

    with tempfile.TemporaryDirectory() as scratch:
        fp32, prepared, int8 = (Path(scratch) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        write_onnx(fold_batchnorm(model.cpu()), calibration[:2], fp32)
        # Shape inference and graph clean-up before quantizing, as ONNX Runtime's quantization guide asks.
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        classifier = [node.name for node in onnx.load(str(prepared)).graph.node if node.op_type in ("Gemm", "MatMul")]
        quantize_static(str(prepared), str(int8), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=weight_type(), nodes_to_exclude=classifier)
        return int8.read_bytes()


class OnnxRuntimeNetwork(nn.Module):
    """An ONNX model (the int8 one here; bench also runs the fp32 export) run by ONNX Runtime on the CPU:
    normalized fp32 batch in, fp32 logits out."""

    def __init__(self, onnx_model: bytes):
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError(INSTALL_HINT) from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()  # the threads torch would use, as for the fp32 paths
        self.session = ort.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise ValueError(f"--precision int8 runs on the CPU (ONNX Runtime); the batch is on {x.device}")
        (logits,) = self.session.run(None, {"images": x.float().contiguous().numpy()})
        return torch.from_numpy(logits)


def int8_inference(model: nn.Module, calibration: torch.Tensor) -> OnnxRuntimeNetwork:
    return OnnxRuntimeNetwork(quantized_onnx(model, calibration))

