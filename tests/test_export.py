"""BN folding, the fast inference path, and `resnetlab export` reproduce the model's outputs."""

import json
from functools import partial

import pytest
import torch
from torch import nn

from resnetlab import bench
from resnetlab.checkpoint import save_checkpoint
from resnetlab.cli import main
from resnetlab.export import fast_inference, fold_batchnorm
from resnetlab.factory import create_model
from resnetlab.precision import cpu_has_bf16


def with_trained_looking_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fresh BNs are identities in eval mode, which would make folding trivially right: give them real stats."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.rand(c, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
            module.weight.data.copy_(torch.rand(c, generator=generator) + 0.5)
            module.bias.data.copy_(torch.rand(c, generator=generator) * 0.6 - 0.3)
    return model.eval()


@pytest.mark.parametrize("name, kwargs, size", [
    ("resnet20", {}, 32),                 # option A shortcuts: no BN outside the blocks' convK/bnK pairs
    ("resnet20", {"shortcut": "C"}, 32),  # a conv + BN projection (nn.Sequential) on every block
    ("resnet18", {}, 64),                 # ImageNet stem, option B projections
    ("resnet50", {}, 64),                 # bottlenecks: conv3/bn3
])
def test_folded_model_has_no_bn_and_matches_within_1e_4(name, kwargs, size):
    torch.manual_seed(0)
    model = with_trained_looking_bn(create_model(name, **kwargs)).train()
    x = torch.randn(3, 3, size, size)
    folded = fold_batchnorm(model)
    assert model.training, "the original model keeps its mode"
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    with torch.no_grad():
        expected = model.eval()(x)
        assert (folded(x) - expected).abs().max().item() < 1e-4
        assert (fast_inference(model, precision="fp32")(x) - expected).abs().max().item() < 1e-4


@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no native bf16")
def test_fast_bf16_path_returns_fp32_logits_close_to_fp32():
    torch.manual_seed(0)
    model = with_trained_looking_bn(create_model("resnet20"))
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        logits = fast_inference(model, precision="bf16")(x)
        fp32_logits = fast_inference(model, precision="fp32")(x)
    assert logits.dtype == torch.float32
    assert ((logits - expected).norm() / expected.norm()).item() < 0.05  # bf16 keeps ~3 significant digits
    assert not torch.equal(logits, fp32_logits), "the bf16 path computed in fp32"


@pytest.mark.slow  # compiling takes 30 s to minutes on 2 cores
def test_compiled_fast_path_freezes_weights_and_matches_within_1e_4():
    torch.manual_seed(0)
    model = with_trained_looking_bn(create_model("resnet20"))
    x = torch.randn(8, 3, 32, 32)
    compiled = fast_inference(model, precision="fp32", compile=True)
    with torch.inference_mode():
        expected, logits = model(x), compiled(x)
    assert torch._inductor.config.freezing
    assert (logits - expected).abs().max().item() < 1e-4


def test_fast_inference_rejects_an_unknown_precision():
    with pytest.raises(ValueError, match="precision='fp16' is not valid"):
        fast_inference(create_model("resnet20"), precision="fp16")


@pytest.fixture
def checkpoint(tmp_path):
    """A 1-channel, 10-class resnet20 checkpoint, as `resnetlab train` writes for MNIST."""
    torch.manual_seed(1)
    model = with_trained_looking_bn(create_model("resnet20", num_classes=10, in_channels=1))
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model_name": "resnet20", "model_kwargs": {"num_classes": 10, "in_channels": 1},
                     "model": model.state_dict()}, path)
    return path, model


def test_export_torchscript_reproduces_the_model(checkpoint, capsys):
    path, model = checkpoint
    assert main(["export", str(path), "--format", "torchscript"]) == 0
    exported = path.with_name("checkpoint.torchscript.pt")
    assert f"wrote {exported}" in capsys.readouterr().out
    x = torch.randn(3, 1, 32, 32)  # a batch size other than the traced one
    with torch.no_grad():
        assert (torch.jit.load(str(exported))(x) - model(x)).abs().max().item() < 1e-4
    assert torch.load(path, weights_only=True)["model_name"] == "resnet20", "the checkpoint is left alone"


def test_export_onnx_reproduces_the_model_in_onnx_runtime(checkpoint, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    path, model = checkpoint
    out = tmp_path / "net.onnx"
    assert main(["export", str(path), "--format", "onnx", "--out", str(out)]) == 0
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 32, 32)
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        assert (torch.from_numpy(logits) - model(x)).abs().max().item() < 1e-4


def test_export_of_a_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path / "nope.pt"), "--format", "onnx"]) == 2
    assert f"resnetlab export: error: checkpoint {tmp_path / 'nope.pt'} does not exist" in capsys.readouterr().err


def test_bench_train_json_reports_the_reference_and_the_default_path(monkeypatch, capsys):
    """A few training steps per path: the command, its rows and keys (speeds are measured under -m slow only)."""
    monkeypatch.setattr(bench, "matmul_roof", partial(bench.matmul_roof, size=64, repeats=1))  # the roof's keys
    assert main(["bench", "train", "--model", "resnet20", "--batch-size", "8", "--seconds", "0.01", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert {key: summary[key] for key in ("kind", "model", "batch_size")} == {
        "kind": "train", "model": "resnet20", "batch_size": 8}
    assert summary["reference"]["path"] == "reference (fp32, NCHW, per-image DataLoader)"
    assert summary["default"]["path"].startswith("resnetlab default (fp32")
    assert summary["paths"][:2] == [summary["reference"], summary["default"]]
    for row in summary["paths"]:
        assert set(row) == {"path", "images_per_second", "min", "max", "gflops", "vs_reference", "fraction_of_roof"}
        assert 0 < row["min"] <= row["images_per_second"] <= row["max"]
    assert summary["reference"]["vs_reference"] == 1
    assert summary["fp32_roof_gflops"] > 0 and summary["bf16_roof_gflops"] > 0


@pytest.mark.slow
def test_bench_infer_json_reports_both_paths_from_the_same_run(capsys):
    assert main(["bench", "infer", "--model", "resnet20", "--seconds", "0.6", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["reference"]["path"].startswith("reference")
    assert summary["default"]["path"].startswith("resnetlab fast path")
    assert summary["reference"]["images_per_second"] > 0 and summary["default"]["images_per_second"] > 0
    assert summary["default"]["vs_reference"] == pytest.approx(
        summary["default"]["images_per_second"] / summary["reference"]["images_per_second"])
    # The int8 path and ONNX Runtime's fp32 are rows of the same run, and the roofs of both float formats are given.
    pytest.importorskip("onnxruntime")
    names = [row["path"] for row in summary["paths"]]
    assert summary["int8"]["path"] == "resnetlab --precision int8 (ONNX Runtime static int8)"
    assert summary["int8"] in summary["paths"]
    assert any(name.startswith("ONNX Runtime") and name.endswith("(BN folded, fp32)") for name in names)
    assert summary["fp32_roof_gflops"] > 0 and summary["bf16_roof_gflops"] > 0
    roof = max(summary["fp32_roof_gflops"], summary["bf16_roof_gflops"])
    assert summary["int8"]["fraction_of_roof"] == pytest.approx(summary["int8"]["gflops"] / roof)
