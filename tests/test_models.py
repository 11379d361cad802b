"""The model zoo: the paper's networks with exact sizes, the shortcut options, initialisation, backbone use and
the errors of bad arguments. Parity with torchvision's weights and logits is in test_torchvision_parity.py."""

import pytest
import torch
from torch import nn

import resnetlab
from resnetlab.models import MODELS, BasicBlock, Bottleneck, ZeroPadShortcut

# torchvision's documented parameter counts (ImageNet, 1000 classes).
IMAGENET_PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                   "resnet101": 44_549_160, "resnet152": 60_192_808}
# The CIFAR nets with option A, counted once from the architecture of paper Sec. 4.2; the paper rounds them to
# 0.27M, 0.46M, 0.66M, 0.85M, 1.7M and 19.4M (Table 6), which test_paper_rounding checks independently.
CIFAR_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
                "resnet110": 1_727_962, "resnet1202": 19_421_274}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", IMAGENET_PARAMS)
def test_imagenet_parameter_counts(name):
    assert n_params(resnetlab.create_model(name)) == IMAGENET_PARAMS[name]
    # The stride placement moves no parameters.
    assert n_params(resnetlab.create_model(name, stride_in_1x1=True)) == IMAGENET_PARAMS[name]


@pytest.mark.parametrize("name", [n for n in CIFAR_PARAMS if n != "resnet1202"])
def test_cifar_parameter_counts(name):
    assert n_params(resnetlab.create_model(name)) == CIFAR_PARAMS[name]


def test_cifar_parameter_counts_round_to_the_paper():
    from resnetlab.paper import CIFAR_PARAMS_M

    for name, count in CIFAR_PARAMS.items():
        depth = int(name.removeprefix("resnet"))
        assert round(count / 1e6, 2 if depth < 110 else 1) == CIFAR_PARAMS_M[depth], name


def test_cifar_params_follow_the_6n_plus_2_rule():
    # Each basic block of w filters holds 2 convs of 9w^2 weights and 2 BNs of 2w; option A adds nothing.
    def expected(n: int) -> int:
        stem = 3 * 9 * 16 + 2 * 16
        stages = 0
        previous = 16
        for width in (16, 32, 64):
            first = 9 * previous * width + 9 * width * width + 4 * width
            stages += first + (n - 1) * (18 * width * width + 4 * width)
            previous = width
        return stem + stages + 64 * 10 + 10

    for n in (1, 3, 9, 18):
        assert n_params(resnetlab.cifar_resnet(6 * n + 2)) == expected(n)


def test_every_named_model_is_listed_and_builds_through_the_factory():
    names = resnetlab.list_models()
    for depth in (18, 34, 50, 101, 152, 20, 32, 44, 56, 110, 1202):
        assert f"resnet{depth}" in names and f"plain{depth}" in names
    assert len(names) == 22
    assert isinstance(resnetlab.create_model("plain20"), resnetlab.ResNet)


@pytest.mark.parametrize("name", list(MODELS))
def test_each_model_spec_says_what_its_builder_builds(name):
    spec = MODELS[name]
    with torch.device("meta"):  # the architecture without weights: resnet1202 costs nothing
        model = spec.build()
    weighted_layers = [m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))
                       and "downsample" not in n]  # the paper counts the layers on the main path
    assert len(weighted_layers) == spec.depth
    assert (model.stem, model.residual) == (spec.family, spec.residual)
    assert name == f"{'resnet' if spec.residual else 'plain'}{spec.depth}"


@pytest.mark.parametrize("depth", [20, 56])
def test_option_a_and_plain_nets_have_equal_parameter_counts(depth):
    assert n_params(resnetlab.create_model(f"resnet{depth}")) == n_params(resnetlab.create_model(f"plain{depth}"))


def test_shortcut_options_order_c_above_b_above_a_for_resnet34():
    a, b, c = (n_params(resnetlab.create_model("resnet34", shortcut=s)) for s in "ABC")
    assert c > b > a
    # B projects exactly where the shape changes: 3 stages x (1x1 conv + BN).
    assert b - a == sum(i * o + 2 * o for i, o in ((64, 128), (128, 256), (256, 512)))
    assert a == n_params(resnetlab.create_model("plain34"))


def test_plain_nets_have_no_shortcut_modules_and_option_a_has_no_parameters():
    plain = resnetlab.create_model("plain56")
    assert all(block.downsample is None and not block.residual
               for stage in plain.stages() for block in stage)
    option_a = resnetlab.create_model("resnet56")
    pads = [m for m in option_a.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(pads) == 2 and all(not list(p.parameters()) for p in pads)
    c = resnetlab.create_model("resnet20", shortcut="C")
    assert all(isinstance(block.downsample, nn.Sequential) for stage in c.stages() for block in stage)


def test_option_a_shortcut_subsamples_and_zero_pads():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    y = ZeroPadShortcut(extra_channels=3, stride=2)(x)
    assert y.shape == (2, 6, 2, 2)
    assert torch.equal(y[:, :3], x[:, :, ::2, ::2])
    assert torch.equal(y[:, 3:], torch.zeros(2, 3, 2, 2))


def test_stride_placement_of_the_bottleneck():
    torchvision_form = resnetlab.create_model("resnet50").layer2[0]
    paper_form = resnetlab.create_model("resnet50", stride_in_1x1=True).layer2[0]
    assert (torchvision_form.conv1.stride, torchvision_form.conv2.stride) == ((1, 1), (2, 2))
    assert (paper_form.conv1.stride, paper_form.conv2.stride) == ((2, 2), (1, 1))


def test_he_initialisation_and_bn_defaults():
    torch.manual_seed(0)
    model = resnetlab.create_model("resnet50")
    conv = model.layer3[0].conv2  # 3x3, 256 out: fan_out = 256 * 9
    expected_std = (2 / (conv.out_channels * 9)) ** 0.5
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.02)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


def test_zero_init_residual_zeroes_the_last_bn_of_each_branch():
    model = resnetlab.create_model("resnet50", zero_init_residual=True)
    for m in model.modules():
        if isinstance(m, Bottleneck):
            assert torch.all(m.bn3.weight == 0) and torch.all(m.bn2.weight == 1)
    with pytest.raises(ValueError, match="zero_init_residual=True needs residual=True"):
        resnetlab.create_model("plain20", zero_init_residual=True)


def test_with_its_branch_zeroed_a_residual_block_is_relu_of_its_input_and_a_plain_block_is_zero():
    torch.manual_seed(0)
    residual = BasicBlock(8, 8, residual=True).eval()
    plain = BasicBlock(8, 8, residual=False).eval()
    for block in (residual, plain):
        nn.init.zeros_(block.bn2.weight)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert torch.equal(residual(x.clone()), x.relu())
        assert torch.equal(residual(x.abs()), x.abs())
        assert torch.equal(plain(x.clone()), torch.zeros_like(x))


@pytest.mark.parametrize(("name", "size", "stages"), [
    ("resnet18", (224, 224), {"layer1": (64, 56, 56), "layer4": (512, 7, 7)}),
    ("resnet50", (200, 300), {"layer1": (256, 50, 75), "layer2": (512, 25, 38), "layer4": (2048, 7, 10)}),
    ("resnet20", (32, 32), {"layer1": (16, 32, 32), "layer3": (64, 8, 8)}),
    ("resnet20", (200, 300), {"layer3": (64, 50, 75)}),
])
def test_output_and_feature_shapes_at_any_input_size(name, size, stages):
    model = resnetlab.create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        outputs = model.forward_stages(x)
        assert model(x).shape == (2, 7)
    assert list(outputs) == model.stage_names
    for stage, shape in stages.items():
        assert outputs[stage].shape == (2, *shape)


def test_forward_features_is_the_last_stage_where_the_classifier_begins():
    model = resnetlab.create_model("resnet20").eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (3, model.num_features, 8, 8)
        torch.testing.assert_close(features, model.forward_stages(x)[model.stage_names[-1]])
        torch.testing.assert_close(model.fc(features.mean((2, 3))), model(x))


def test_grayscale_input_and_class_count():
    model = resnetlab.create_model("resnet18", in_channels=1, num_classes=3)
    assert model.conv1.weight.shape == (64, 1, 7, 7) and model.fc.out_features == 3
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3)


def test_any_6n_plus_2_depth_through_the_builder():
    model = resnetlab.create_model("cifar_resnet", depth=8)
    assert [len(stage) for stage in model.stages()] == [1, 1, 1]
    assert len(resnetlab.create_model("cifar_plain", depth=14).layer2) == 2


@pytest.mark.parametrize("name", ["resnet110", pytest.param("resnet1202", marks=pytest.mark.slow)])
def test_gradients_reach_the_stem(name):
    # 8x8 inputs keep the 1,202-layer pass cheap in FLOPs; the depth, which is what is tested, is the real one.
    torch.manual_seed(0)
    model = resnetlab.create_model(name)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 8, 8)), torch.tensor([0, 1]))
    loss.backward()
    grad = model.conv1.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_activation_checkpointing_recomputes_blocks_and_changes_no_number():
    torch.manual_seed(0)
    kept = resnetlab.create_model("resnet32")  # 5 blocks a stage: segments of 2, 2 and 1
    recomputed = resnetlab.create_model("resnet32")
    recomputed.load_state_dict(kept.state_dict())
    recomputed.activation_checkpointing = True
    calls = []
    recomputed.layer2[4].conv1.register_forward_hook(lambda *_: calls.append(1))
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for model in (kept, recomputed):
        nn.functional.cross_entropy(model(x), y).backward()
    assert len(calls) == 2  # once forward, once again in backward
    for (name, a), b in zip(kept.named_parameters(), recomputed.parameters()):
        assert torch.equal(a.grad, b.grad), name
    # BN running statistics: one momentum update per step, not a second one from the recomputation
    for (name, a), b in zip(kept.named_buffers(), recomputed.buffers()):
        assert torch.equal(a, b), name
    recomputed.eval()
    with torch.no_grad():
        recomputed(x)
    assert len(calls) == 3  # evaluation keeps nothing for backward, so it computes each block once


def test_resnet1202_parameter_count():
    assert n_params(resnetlab.create_model("resnet1202")) == CIFAR_PARAMS["resnet1202"]


@pytest.mark.parametrize(("call", "message"), [
    (lambda: resnetlab.create_model("resnet19"), r"unknown model 'resnet19'; choose one of resnet18, plain18"),
    (lambda: resnetlab.create_model("cifar_resnet", depth=21),
     r"depth=21 is not valid for a CIFAR ResNet; it must be 6n\+2"),
    (lambda: resnetlab.create_model("resnet20", shortcut="D"),
     r"shortcut='D' is not valid; choose one of 'A', 'B', 'C'"),
    (lambda: resnetlab.create_model("resnet20", num_classes=0),
     r"num_classes=0 is not valid; it must be a positive integer"),
    (lambda: resnetlab.create_model("resnet18", in_channels=-1), r"in_channels=-1 is not valid"),
    (lambda: resnetlab.create_model("resnet20", dropout=0.5), r"resnet20: .*dropout.*; valid arguments: num_classes"),
    (lambda: resnetlab.imagenet_resnet(42),
     r"depth=42 is not an ImageNet ResNet depth; choose one of \[18, 34, 50, 101, 152\]"),
])
def test_bad_arguments_raise_value_errors_naming_what_is_valid(call, message):
    with pytest.raises(ValueError, match=message):
        call()
