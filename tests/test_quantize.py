"""int8 inference (resnetlab.quantize): what `--precision int8` writes and computes, and the errors it gives.

The network is a resnet20 trained for 200 iterations on the 8x8 digits (5% test error), so its scores are those of
a trained network; the agreement test on real photographs, with a ResNet trained on CIFAR-10, is in
test_cifar10.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from run_helpers import tiny_config

import resnetlab.inference as inference
import resnetlab.quantize as quantize
from resnetlab.checkpoint import load_checkpoint, save_checkpoint
from resnetlab.cli import main
from resnetlab.data import load_dataset
from resnetlab.data.augment import Normalize
from resnetlab.evaluate import load_models
from resnetlab.factory import load_model
from resnetlab.inference import evaluate_checkpoints, predict
from resnetlab.precision import resolve_precision
from resnetlab.quantize import (
    CALIBRATION_IMAGES,
    OnnxRuntimeNetwork,
    calibration_batch,
    cpu_has_vnni,
    int8_inference,
    quantized_onnx,
    run_calibration_batch,
)
from resnetlab.train import train

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    config = tiny_config(tmp_path_factory.mktemp("run") / "out", iterations=200, train_eval_size=100,
                         device="cpu")
    train(config, progress=False)
    return Path(config.out)


@pytest.fixture(scope="module")
def int8_file(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "net.int8.onnx"
    assert main(["export", str(run), "--format", "onnx", "--precision", "int8", "--out", str(out)]) == 0
    return out


def test_calibration_images_are_evenly_spaced_training_images_normalized():
    data = load_dataset("digits").train
    normalize = Normalize.fit(data.images)
    batch = calibration_batch(data, normalize, count=4)
    spaced = np.linspace(0, len(data) - 1, 4).round().astype(int)
    assert torch.equal(batch, normalize(data.images[spaced]))
    assert len(calibration_batch(data, normalize)) == CALIBRATION_IMAGES


def test_int8_calibrates_on_the_runs_training_images_not_its_test_images(run, tmp_path, monkeypatch):
    from PIL import Image

    calibrations = []

    def recording_int8_inference(model, calibration):
        calibrations.append(calibration)
        return int8_inference(model, calibration)

    monkeypatch.setattr(inference, "int8_inference", recording_int8_inference)
    image = tmp_path / "x.png"
    Image.new("L", (8, 8)).save(image)
    predict(run, [image], k=1, precision="int8")
    normalize = Normalize.from_state_dict(load_checkpoint(run)["normalize"])
    digits = load_dataset("digits")
    assert len(calibrations) == 1
    assert torch.equal(calibrations[0], calibration_batch(digits.train, normalize))
    assert not torch.equal(calibrations[0][:100], calibration_batch(digits.test, normalize)[:100])


def conv_weight_types(graph) -> list[int]:
    return [t.data_type for t in graph.initializer if len(t.dims) == 4]


def test_int8_export_holds_int8_weights_per_channel_and_quantized_activations(int8_file):
    graph = onnx.load(str(int8_file)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    initializers = {t.name: t for t in graph.initializer}
    eight_bit = onnx.TensorProto.INT8 if cpu_has_vnni() else onnx.TensorProto.UINT8
    conv_weights = {name for name, t in initializers.items() if t.data_type == eight_bit and len(t.dims) == 4}
    # resnet20 has 19 convolutions (option A shortcuts have none), all 8-bit; the fc stays fp32.
    assert len(conv_weights) == 19 and len(conv_weight_types(graph)) == 19
    assert not [t for t in initializers.values() if t.data_type == eight_bit and len(t.dims) == 2]
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in conv_weights:
            out_channels = initializers[node.input[0]].dims[0]
            assert initializers[node.input[1]].dims == [out_channels], "one scale per output channel"


@pytest.mark.parametrize(("vnni", "expected"), [(True, onnx.TensorProto.INT8), (False, onnx.TensorProto.UINT8)])
def test_weights_are_signed_only_where_the_cpu_multiplies_them_without_saturating(run, monkeypatch, vnni, expected):
    monkeypatch.setattr(quantize, "cpu_has_vnni", lambda: vnni)
    (model, state), = load_models([run], torch.device("cpu"))
    graph = onnx.load_from_string(quantized_onnx(model, run_calibration_batch(state, count=32))).graph
    assert conv_weight_types(graph) == [expected] * 19


def test_int8_file_in_onnx_runtime_follows_the_fp32_model(run, int8_file):
    import onnxruntime

    model, state = load_model(run)
    test = load_dataset("digits").test
    x = Normalize.from_state_dict(state["normalize"])(test.images)
    session = onnxruntime.InferenceSession(str(int8_file), providers=["CPUExecutionProvider"])
    (int8_logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        fp32_logits = model(x)
    int8_logits = torch.from_numpy(int8_logits)
    assert ((int8_logits - fp32_logits).norm() / fp32_logits.norm()).item() < 0.05
    assert (int8_logits.argmax(1) == fp32_logits.argmax(1)).float().mean().item() >= 0.98


def test_evaluate_in_int8_is_within_a_point_of_fp32(run, capsys, monkeypatch):
    fp32 = evaluate_checkpoints([run], device="cpu")
    batch_sizes = []
    forward = OnnxRuntimeNetwork.forward
    monkeypatch.setattr(OnnxRuntimeNetwork, "forward", lambda self, x: batch_sizes.append(len(x)) or forward(self, x))
    int8 = evaluate_checkpoints([run], device="cpu", precision="int8")
    assert sum(batch_sizes) == int8["images"] == 360, "every test image went through the int8 network"
    assert (fp32["precision"], int8["precision"]) == ("fp32", "int8")
    assert fp32["top1_error"] < 0.15, "the network is trained"
    assert abs(int8["top1_error"] - fp32["top1_error"]) <= 0.01
    assert main(["evaluate", str(run), "--precision", "int8"]) == 0
    assert f"center, int8: top-1 error {100 * int8['top1_error']:.2f}%" in capsys.readouterr().out


def test_predict_in_int8_ranks_as_fp32(run, tmp_path):
    from PIL import Image

    test = load_dataset("digits").test
    paths = []
    for i in range(8):
        path = tmp_path / f"{i}.png"
        Image.fromarray(test.images[i, 0].numpy()).save(path)
        paths.append(path)
    fp32 = predict(run, paths, k=1, precision="fp32")
    int8 = predict(run, paths, k=1, precision="int8")
    assert [top[0][0] for top in int8] == [top[0][0] for top in fp32]
    assert [top[0][1] for top in int8] == pytest.approx([top[0][1] for top in fp32], abs=0.05)
    assert [top[0][1] for top in int8] != [top[0][1] for top in fp32], "int8 rounds: its scores are not fp32's"


def test_int8_module_refuses_a_batch_off_the_cpu(run):
    model, state = load_model(run)
    network = OnnxRuntimeNetwork(quantized_onnx(model, torch.zeros(2, 1, 8, 8)))
    assert network(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(ValueError, match="int8 runs on the CPU"):
        network(torch.zeros(3, 1, 8, 8, device="meta"))


def test_int8_is_refused_on_a_gpu_by_name():
    with pytest.raises(ValueError, match=r"--precision int8 runs on the CPU \(ONNX Runtime\), not on cuda"):
        resolve_precision("int8", torch.device("cuda"), training=False)
    with pytest.raises(ValueError, match="--precision 'int8' is not valid; choose one of fp32, bf16"):
        resolve_precision("int8", torch.device("cpu"), training=True)


def test_int8_torchscript_export_is_refused(run, capsys):
    assert main(["export", str(run), "--format", "torchscript", "--precision", "int8"]) == 2
    assert "--precision int8 is exported as ONNX only" in capsys.readouterr().err


def test_a_checkpoint_without_its_dataset_asks_for_calibration_data(run, tmp_path, capsys):
    state = load_checkpoint(run)
    state.pop("config")
    bare = tmp_path / "bare.pt"
    save_checkpoint(state, bare)
    assert main(["export", str(bare), "--format", "onnx", "--precision", "int8"]) == 2
    assert "does not record its dataset: give --calibration-data SPEC" in capsys.readouterr().err
    out = tmp_path / "bare.int8.onnx"
    assert main(["export", str(bare), "--format", "onnx", "--precision", "int8", "--calibration-data", "digits"]) == 0
    assert out.stat().st_size > 0


def test_a_missing_calibration_dataset_is_named(run, tmp_path, capsys):
    from PIL import Image

    missing, image = tmp_path / "nowhere", tmp_path / "x.png"
    Image.new("L", (8, 8)).save(image)
    assert main(["predict", str(run), str(image), "--precision", "int8",
                 "--calibration-data", f"mnist:{missing}"]) == 2
    err = capsys.readouterr().err
    assert f"mnist:{missing}" in err and "--calibration-data" in err


def test_evaluate_json_records_the_precision(run, capsys):
    assert main(["evaluate", str(run), "--precision", "int8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["precision"] == "int8"
