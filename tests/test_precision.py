"""bf16 keeps the residual stream in fp32, and fp32 computes exactly what it did before that change; the precision
names and what they resolve to."""

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnetlab import models, precision
from resnetlab.cli import build_parser
from resnetlab.factory import create_model
from resnetlab.models import BasicBlock, Bottleneck
from resnetlab.precision import PRECISIONS, resolve_precision


def plain_sum(block, branch, x):
    """add_shortcut as it was: the sum in the operands' dtype."""
    if not block.residual:
        return branch
    return branch + (x if block.downsample is None else block.downsample(x))


def forward_and_gradients(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(x)
    F.cross_entropy(logits, torch.arange(len(x)) % logits.shape[1]).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name, kwargs, size", [
    ("resnet20", {}, 32),                     # option A: zero-padded identity
    ("resnet20", {"shortcut": "C"}, 32),      # projections on every block
    ("resnet50", {}, 32),                     # bottlenecks, option B, ImageNet stem
])
def test_fp32_logits_and_gradients_are_bit_identical_to_the_plain_sum(monkeypatch, name, kwargs, size):
    torch.manual_seed(0)
    model = create_model(name, **kwargs).train()
    x = torch.randn(4, 3, size, size)
    logits, grads = forward_and_gradients(model, x)
    monkeypatch.setattr(models, "add_shortcut", plain_sum)
    plain_logits, plain_grads = forward_and_gradients(model, x)
    assert torch.equal(logits, plain_logits)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_bf16_autocast_runs_convs_in_bf16_and_the_residual_stream_in_fp32(name):
    torch.manual_seed(0)
    model = create_model(name).train()
    dtypes: dict[str, torch.dtype] = {}

    def record(module_name):
        return lambda module, inputs, output: dtypes.__setitem__(module_name, output.dtype)

    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, BasicBlock, Bottleneck)):
            module.register_forward_hook(record(module_name))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 32, 32))
    blocks = {n for n, m in model.named_modules() if isinstance(m, (BasicBlock, Bottleneck))}
    convs = set(dtypes) - blocks
    assert blocks and convs
    assert {dtypes[n] for n in blocks} == {torch.float32}
    assert {dtypes[n] for n in convs} == {torch.bfloat16}


def test_with_the_fp32_stream_off_bf16_sums_as_plain_autocast_does(monkeypatch):
    """The switch the benchmarks use to measure what the fp32 stream costs and buys."""
    torch.manual_seed(0)
    model = create_model("resnet20").train()
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fp32_stream, _ = forward_and_gradients(model, x)
        model.fp32_residual_stream = False
        switched_off, switched_off_grads = forward_and_gradients(model, x)
        monkeypatch.setattr(models, "add_shortcut", plain_sum)
        plain, plain_grads = forward_and_gradients(model, x)
    assert not model.fp32_residual_stream and not any(block.fp32_residual_stream for block in model.blocks())
    assert torch.equal(switched_off, plain) and all(torch.equal(a, b) for a, b in zip(switched_off_grads, plain_grads))
    assert not torch.equal(switched_off, fp32_stream)


def test_a_model_in_double_keeps_a_double_stream():
    model = create_model("resnet20").double().eval()
    assert model(torch.randn(2, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


def test_a_plain_network_adds_nothing_and_keeps_the_convs_dtype():
    torch.manual_seed(0)
    block = create_model("plain20").layer1[0].train()
    x = torch.randn(2, 16, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(x)
    assert out.dtype == torch.bfloat16  # no addition happened, so nothing was promoted


# --------------------------------------------------------------------------------------------------------------
# The precision names: one vocabulary, one resolver


def test_training_takes_fp32_and_bf16_as_they_are_and_refuses_auto():
    cpu = torch.device("cpu")
    assert [resolve_precision(name, cpu, training=True) for name in PRECISIONS] == ["fp32", "bf16"]
    with pytest.raises(ValueError, match=re.escape("--precision 'auto' is not valid; choose one of fp32, bf16")):
        resolve_precision("auto", cpu, training=True)


# /proc/cpuinfo's flags line of a Sapphire Rapids Xeon (AMX) and of an Ice Lake one (AVX512-BF16 alone); trimmed.
AMX_FLAGS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni amx_bf16 amx_tile amx_int8\n"
AVX512_BF16_FLAGS = "flags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"


@pytest.mark.parametrize("flags, native_bf16, expected", [
    (AMX_FLAGS, True, "bf16"),
    (AVX512_BF16_FLAGS, True, "fp32"),  # native bf16 measured slower than fp32 without AMX
    (AMX_FLAGS, False, "fp32"),  # a torch without oneDNN's bf16 kernels would emulate bf16
    (None, True, "fp32"),  # no /proc/cpuinfo (not Linux): AMX unknown
])
def test_inference_auto_is_bf16_only_on_a_cpu_with_amx(tmp_path, monkeypatch, flags, native_bf16, expected):
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        cpuinfo.write_text("processor\t: 0\nmodel name\t: a CPU\n" + flags)
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: native_bf16)
    assert resolve_precision("auto", torch.device("cpu"), training=False) == expected
    assert resolve_precision("auto", torch.device("cuda"), training=False) == "fp32"  # unmeasured there: exact


@pytest.mark.parametrize("training", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_allowed_with_a_warning_that_it_is_emulated(monkeypatch, training):
    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match=r"this CPU has no native bf16 \(AVX512-BF16 or AMX\), so it is emulated: "
                                            r"expect it far slower than fp32 \(ResNet-20 training: .*benchmarks.md"):
        assert resolve_precision("bf16", cpu, training=training) == "bf16"
    monkeypatch.setattr(precision, "cpu_has_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native bf16, and fp32 anywhere: nothing to say
        assert resolve_precision("bf16", cpu, training=training) == "bf16"
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda: False)
        assert resolve_precision("fp32", cpu, training=training) == "fp32"


def test_inference_takes_bf16_and_fp32_as_they_are():
    cpu = torch.device("cpu")
    assert [resolve_precision(name, cpu, training=False) for name in ("bf16", "fp32")] == ["bf16", "fp32"]


def test_the_cli_offers_the_library_precisions(capsys):
    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["predict", "run", "image.png", "--precision", "fp16"])
    assert re.search(r"invalid choice: 'fp16' \(choose from '?auto'?, '?bf16'?, '?fp32'?, '?int8'?\)",
                     capsys.readouterr().err)
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    assert "--precision PRECISION fp32 or bf16 " in " ".join(capsys.readouterr().out.split())
