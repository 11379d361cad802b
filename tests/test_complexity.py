"""Parameters and multiply-adds against the paper's Table 1 and torchvision's published figures, and the
`resnetlab models` table that prints them."""

import pytest
import torch
from torch import nn

import resnetlab
from resnetlab.cli import main
from resnetlab.complexity import model_table
from resnetlab.paper import IMAGENET_GFLOPS


@pytest.mark.parametrize("depth", sorted(IMAGENET_GFLOPS))
def test_paper_form_reproduces_table_1_within_0_07_g(depth):
    with torch.device("meta"):  # the same counts as real tensors (test below), without the cost of real weights
        model = resnetlab.create_model(f"resnet{depth}", stride_in_1x1=True)
        assert resnetlab.complexity(model).gmacs == pytest.approx(IMAGENET_GFLOPS[depth], abs=0.07)


def test_exact_macs_of_resnet50_in_both_stride_placements():
    paper = resnetlab.complexity(resnetlab.create_model("resnet50", stride_in_1x1=True))
    torchvision = resnetlab.complexity(resnetlab.create_model("resnet50"))
    assert paper.macs == 3_857_973_248
    assert round(torchvision.gmacs, 2) == 4.09  # torchvision's documented 4.09 GFLOPS
    assert torchvision.params == paper.params == 25_557_032


def test_plain_nets_cost_what_their_residual_twins_cost():
    # Option B's projections are where the two differ; the identity additions are not multiply-adds.
    plain, residual = (resnetlab.complexity(resnetlab.create_model(n)) for n in ("plain34", "resnet34"))
    assert residual.macs - plain.macs == 56 * 56 // 4 * 64 * 128 + 28 * 28 // 4 * 128 * 256 + 14 * 14 // 4 * 256 * 512


def test_resnet20_costs_about_41_million_macs():
    result = resnetlab.complexity(resnetlab.create_model("resnet20"), input_size=(3, 32, 32))
    assert result.macs == 40_551_040  # 40.55 M: convs and the fc, counted by hand below
    convs = 32 * 32 * 16 * 27 + 6 * 32 * 32 * 16 * 144 + 16 * 16 * 32 * (144 + 5 * 288) + 8 * 8 * 64 * (288 + 5 * 576)
    assert result.macs == convs + 64 * 10


def test_macs_scale_with_the_input_area_and_count_convs_and_fc_only():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 5 * 6, 3))
    result = resnetlab.complexity(model, input_size=(2, 5, 6))
    assert result.macs == 5 * 6 * 4 * 2 * 9 + 120 * 3
    assert result.params == sum(p.numel() for p in model.parameters())


def test_meta_device_models_give_the_same_counts_as_real_ones():
    real = resnetlab.complexity(resnetlab.create_model("resnet56"), (3, 32, 32))
    with torch.device("meta"):
        meta = resnetlab.complexity(resnetlab.create_model("resnet56"), (3, 32, 32))
    assert meta == real


def test_complexity_leaves_the_model_as_it_was():
    model = resnetlab.create_model("resnet20").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    resnetlab.complexity(model, (3, 32, 32))
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN running stats untouched
    assert not model.conv1._forward_hooks


def test_bad_input_size_is_named():
    with pytest.raises(ValueError, match=r"input_size=\(224, 224\) is not valid; give \(channels, height, width\)"):
        resnetlab.complexity(resnetlab.create_model("resnet18"), input_size=(224, 224))


def test_models_table_rows_match_the_paper_where_it_has_a_figure():
    rows = {row["name"]: row for row in model_table(stride_in_1x1=True)}
    assert len(rows) == 22
    for depth, gflops in IMAGENET_GFLOPS.items():
        assert rows[f"resnet{depth}"]["gmacs"] == pytest.approx(gflops, abs=0.07)
        assert rows[f"plain{depth}"]["paper"] is None
    assert rows["resnet110"]["params"] == 1_727_962 and rows["resnet110"]["paper"] == 1.7
    assert rows["resnet20"]["shortcut"] == "A" and rows["resnet50"]["shortcut"] == "B"
    assert rows["plain56"]["shortcut"] == "none"


def test_models_command_prints_the_table(capsys):
    assert main(["models", "--stride-in-1x1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "stride on the first 1x1 (paper)" in lines[0]
    by_name = {line.split()[0]: line.split() for line in lines[2:]}
    assert len(by_name) == 22
    assert by_name["resnet50"][4:] == ["25,557,032", "3.858", "3.8", "GFLOPs"]
    assert by_name["resnet1202"][4:] == ["19,421,274", "2.829", "19.4", "M", "params"]
    assert by_name["plain18"][3] == "none"
