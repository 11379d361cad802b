"""resnetlab.detection.model: the paper's trunk/head split of every kind of backbone, RoI pooling at the trunk's
stride, a trained classifier's BN frozen and its first layers kept, and backbone weights loaded from a
torchvision-format file or a resnetlab run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

pytest.importorskip("torchvision", reason="detection needs torchvision (pip install -e '.[detection]'); .ci/run "
                    "runs these tests in a second environment")

from test_export import with_trained_looking_bn  # noqa: E402
from torchvision.ops import FrozenBatchNorm2d  # noqa: E402

from resnetlab.checkpoint import CheckpointError, save_checkpoint  # noqa: E402
from resnetlab.detection.model import (  # noqa: E402
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrunkRoIPool,
    build_detector,
    pretrained_classifier,
    split_resnet,
    split_vgg16,
)
from resnetlab.factory import create_model  # noqa: E402

SMALL = dict(min_size=96, max_size=128, anchor_sizes=(16, 32, 64), aspect_ratios=(0.5, 1.0, 2.0), roi_pool_size=6,
             rpn_pre_nms_train=300, rpn_post_nms_train=100, rpn_pre_nms_test=300, rpn_post_nms_test=50,
             rpn_batch_size=64, rois_per_image=16, box_nms_threshold=0.5, detections_per_image=20)


def small_detector(backbone: str = "resnet18", **kwargs) -> nn.Module:
    return build_detector(backbone, 4, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                          **{"frozen_bn": False, **SMALL, **kwargs})


@pytest.mark.parametrize(("name", "stride", "channels", "head_channels"), [
    ("resnet18", 16, 256, 512), ("resnet50", 16, 1024, 2048), ("plain34", 16, 256, 512), ("resnet20", 2, 32, 64),
])
@torch.no_grad()
def test_the_trunk_ends_before_the_last_stage_and_the_head_halves_the_pooled_region(name, stride, channels,
                                                                                    head_channels):
    network = create_model(name).eval()
    trunk, head = split_resnet(network)
    assert (trunk.stride, trunk.out_channels, head.out_channels) == (stride, channels, head_channels)
    images = torch.randn(1, 3, 64, 96)
    features = trunk(images)
    assert features.shape == (1, channels, 64 // stride, 96 // stride)
    torch.testing.assert_close(features, network.forward_stages(images)[network.stage_names[-2]])
    regions = TrunkRoIPool(14, stride)({"0": features}, [torch.tensor([[0.0, 0.0, 32.0, 32.0], [8, 8, 60, 40]])],
                                       [(64, 96)])
    assert regions.shape == (2, channels, 14, 14)
    last_stage = getattr(network, network.stage_names[-1])
    assert last_stage(regions).shape[-2:] == (7, 7)  # conv5_x's first block has stride 2
    assert head(regions).shape == (2, head_channels)


@torch.no_grad()
def test_vgg16_trunk_is_conv5_3_and_its_head_fc6_fc7():
    from torchvision.models import vgg16

    trunk, head = split_vgg16(vgg16())
    assert (trunk.stride, trunk.out_channels, head.out_channels) == (16, 512, 4096)
    assert isinstance(trunk.features[-1], nn.ReLU) and isinstance(trunk.features[-2], nn.Conv2d)
    assert trunk(torch.randn(1, 3, 64, 96)).shape == (1, 512, 4, 6)
    assert head.eval()(torch.randn(3, 512, 7, 7)).shape == (3, 4096)


@pytest.mark.parametrize("name", ["resnet18", "resnet20", "vgg16"])
def test_the_detector_trains_on_losses_and_predicts_boxes(name):
    torch.manual_seed(0)
    model = small_detector(name)
    images = [torch.rand(3, 96, 128), torch.rand(3, 120, 100)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 80.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0], [50, 60, 90, 110]]), "labels": torch.tensor([1, 3])}]
    losses = model.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) and v >= 0 for v in losses.values())
    with torch.no_grad():
        outputs = model.eval()(images)
    assert len(outputs) == 2
    for output, image in zip(outputs, images):
        count = len(output["scores"])
        assert output["boxes"].shape == (count, 4) and output["labels"].shape == (count,) and count <= 20
        assert ((output["labels"] >= 1) & (output["labels"] <= 3)).all()  # never the background
        assert (output["boxes"][:, 2] <= image.shape[2]).all() and (output["boxes"][:, 3] <= image.shape[1]).all()
    pool = model.roi_heads.box_roi_pool
    assert isinstance(pool, TrunkRoIPool) and pool.pool.output_size == (7 if name == "vgg16" else 6)
    assert pool.pool.spatial_scale == 1 / model.backbone.stride


@pytest.mark.parametrize(("name", "stride"), [("resnet18", 16), ("resnet20", 2), ("vgg16", 16)])
@torch.no_grad()
def test_roi_pooling_pools_the_trunk_cells_under_the_box(name, stride):
    pool = small_detector(name).roi_heads.box_roi_pool
    y, x = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    feature_map = torch.stack([100 * y + x, -(100 * y + x)])[None]  # cell (y, x) holds 100y + x, and its negative
    box = torch.tensor([[2.0, 3.0, 4.0, 5.0]]) * stride  # x1, y1, x2, y2 in image pixels: cells x 2..4, y 3..5
    regions = pool({"0": feature_map}, [box], [(8 * stride, 8 * stride)])
    assert regions.amax((-2, -1)).tolist() == [[504.0, -302.0]]  # its last cell (5, 4) and its first (3, 2)


@pytest.mark.parametrize("name", ["resnet18", "resnet20"])
@torch.no_grad()
def test_a_trained_classifier_computes_in_the_training_detector_as_in_eval_mode(name):
    """Every BN of the trunk and the head frozen: the detector in training mode computes the classifier's eval-mode
    features, not batch statistics."""
    torch.manual_seed(0)
    classifier = with_trained_looking_bn(create_model(name))
    model = build_detector(name, 4, frozen_bn=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                           classifier=copy.deepcopy(classifier), **SMALL).train()
    images = torch.randn(2, 3, 64, 96)
    # A frozen BN folds its statistics into a scale and shift, an order of operations other than BN's eval mode, and
    # the convolutions may take other kernels: 2.4e-5 apart on an AVX2-only CPU. Batch statistics: up to 16 apart.
    torch.testing.assert_close(model.backbone(images),
                               classifier.forward_stages(images)[classifier.stage_names[-2]], rtol=1e-4, atol=1e-4)
    regions = torch.randn(3, model.backbone.out_channels, 6, 6)
    last_stage = getattr(classifier, classifier.stage_names[-1])
    torch.testing.assert_close(model.roi_heads.box_head(regions), classifier.avgpool(last_stage(regions)).flatten(1))


@pytest.mark.parametrize(("name", "kept"), [
    ("resnet18", ("backbone.conv1.", "backbone.layer1.")),  # the stem and conv2_x
    ("resnet20", ("backbone.conv1.", "backbone.layer1.")),
    ("vgg16", tuple(f"backbone.features.{i}." for i in (0, 2, 5, 7))),  # conv1_1, conv1_2, conv2_1, conv2_2
])
def test_a_trained_classifier_s_first_layers_are_kept_and_the_rest_trains(name, kept):
    parameters = dict(small_detector(name, frozen_bn=True).named_parameters())
    fixed = {key for key, parameter in parameters.items() if not parameter.requires_grad}
    assert fixed == {key for key in parameters if key.startswith(kept)}
    assert all(any(key.startswith(layer) for key in fixed) for layer in kept)
    assert all(parameter.requires_grad for parameter in small_detector(name, frozen_bn=False).parameters())


def test_frozen_bn_stays_constant_while_the_convolutions_train():
    torch.manual_seed(0)
    model = small_detector(frozen_bn=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in create_model("resnet18").modules())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    images = [torch.rand(3, 96, 128)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 80.0]]), "labels": torch.tensor([2])}]
    sum(model.train()(images, targets).values()).backward()
    optimizer.step()
    after = model.state_dict()
    bn_keys = [k for k in before if k.rsplit(".", 1)[-1] in ("running_mean", "running_var")
               or ".bn" in k or ".downsample.1." in k]
    assert len(bn_keys) > 40 and all(torch.equal(before[k], after[k]) for k in bn_keys)
    assert not torch.equal(before["backbone.layer3.0.conv1.weight"], after["backbone.layer3.0.conv1.weight"])


def test_trained_bn_updates_its_statistics_from_scratch():
    torch.manual_seed(0)
    model = small_detector(frozen_bn=False)
    before = model.state_dict()["backbone.bn1.running_mean"].clone()
    model.train()([torch.rand(3, 96, 128)], [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 80.0]]),
                                               "labels": torch.tensor([2])}])
    assert not torch.equal(before, model.state_dict()["backbone.bn1.running_mean"])


def test_torchvision_format_weights_load_into_trunk_and_head(tmp_path):
    torch.manual_seed(1)
    classifier = create_model("resnet18")
    for name, tensor in classifier.state_dict().items():  # every tensor distinct, so a key mix-up shows
        if tensor.is_floating_point():
            tensor.copy_(torch.randn_like(tensor) * 0.01 + (1.0 if "running_var" in name else 0.0)).abs_()
    torch.save(classifier.state_dict(), tmp_path / "resnet18.pth")
    network, settings, mean, std = pretrained_classifier("resnet18", tmp_path / "resnet18.pth")
    assert (settings, mean, std) == ({}, IMAGENET_MEAN, IMAGENET_STD)
    model = build_detector("resnet18", 4, frozen_bn=True, image_mean=mean, image_std=std, classifier=network,
                           **SMALL)
    state = model.state_dict()
    expected = classifier.state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer3.1.conv2.weight", "layer3.0.downsample.1.bias"):
        assert torch.equal(state[f"backbone.{key}"], expected[key])
    assert torch.equal(state["roi_heads.box_head.layer4.1.bn2.weight"], expected["layer4.1.bn2.weight"])
    assert "roi_heads.box_predictor.cls_score.weight" in state and not any(k.endswith("fc.weight") for k in state)


def test_weights_of_another_network_or_no_weights_at_all_are_refused(tmp_path):
    torch.save(create_model("resnet34").state_dict(), tmp_path / "resnet34.pth")
    with pytest.raises(CheckpointError, match=r"resnet34.pth seems to be for resnet34 \(1000 classes, 3 input "
                       r"channels\), not resnet18 .*: unexpected layer1.2.conv1.weight"):
        pretrained_classifier("resnet18", tmp_path / "resnet34.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="junk.pth is truncated or corrupt"):
        pretrained_classifier("resnet18", tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match="no such file or run directory"):
        pretrained_classifier("resnet18", tmp_path / "absent.pth")


def test_a_resnetlab_run_gives_its_weights_and_its_own_mean(tmp_path):
    classifier = create_model("resnet20", num_classes=10)
    mean = torch.stack([torch.full((32, 32), value) for value in (0.5, 0.4, 0.3)])
    mean[0, 0, 0] += 0.32  # per pixel: its per-channel average is what detection subtracts
    save_checkpoint({"model_name": "resnet20", "model_kwargs": {"num_classes": 10, "in_channels": 3},
                     "normalize": {"mean": mean, "std": None}, "model": classifier.state_dict(), "classes": []},
                    tmp_path / "checkpoint.pt")
    network, settings, image_mean, image_std = pretrained_classifier("resnet20", tmp_path)
    assert image_mean == pytest.approx((0.5 + 0.32 / 1024, 0.4, 0.3)) and image_std == (1.0, 1.0, 1.0)
    assert settings == {"num_classes": 10, "in_channels": 3}
    assert torch.equal(network.layer2[0].conv1.weight, classifier.layer2[0].conv1.weight)
    with pytest.raises(CheckpointError, match="holds a resnet20, not a resnet32"):
        pretrained_classifier("resnet32", tmp_path)
