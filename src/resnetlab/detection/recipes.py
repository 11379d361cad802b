"""Detection recipes as data, and the settings of one detection run.

``voc`` and ``coco`` are the paper's settings (Appendix A, after Faster R-CNN): images resized to a shorter side
of 600 (longer side at most 1000), anchors of 3 scales and 3 aspect ratios (COCO adds the 64-pixel scale, as
Faster R-CNN does there), 256 anchors and 128 regions sampled per image, 300 proposals per image at test time,
SGD with momentum 0.9 and weight decay 0.0005, and the paper's learning rates and schedules: VOC 0.001 for 60k
iterations then 0.0001 for 20k (one image per iteration); COCO 0.001 for 240k iterations then 0.0001 for 80k
(8 images per iteration). ``small`` is not the paper's: small images and anchors, fewer regions, for CPU checks.

Resolution order, later wins: the preset named by `recipe`, then a TOML file, then command-line flags (the same
rules as the classification recipes, resnetlab.recipes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from resnetlab.recipes import (
    DEVICES,
    check_milestones,
    check_non_negative_int,
    check_positive_float,
    check_positive_int,
    flag,
    is_real,
    merge_settings,
    rescaled_milestones,
)


@dataclass(frozen=True)
class DetectionRecipe:
    name: str
    images_per_batch: int
    lr: float
    iterations: int
    lr_milestones: tuple[int, ...]
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_decay: float = 0.1
    ramp_iterations: int = 0  # the linear lr ramp of the classification recipes (Recipe.ramp_iterations); 0: off
    min_size: int = 600  # shorter side of every image, in pixels
    max_size: int = 1000  # unless its longer side would exceed this
    anchor_sizes: tuple[int, ...] = (128, 256, 512)  # anchor side (square root of its area), pixels
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    roi_pool_size: int = 14  # ResNet heads; VGG-16's fc6 takes 7x7 whatever this says
    rpn_pre_nms_train: int = 12_000  # proposals kept per image before / after the RPN's NMS
    rpn_post_nms_train: int = 2000
    rpn_pre_nms_test: int = 6000
    rpn_post_nms_test: int = 300
    rpn_batch_size: int = 256  # anchors sampled per image for the RPN loss
    rois_per_image: int = 128  # regions sampled per image for the detection loss (25% foreground)
    box_nms_threshold: float = 0.3
    detections_per_image: int = 100
    flip: bool = True  # horizontal flips of the training images

    def with_iterations(self, iterations: int) -> DetectionRecipe:
        return replace(self, iterations=iterations,
                       lr_milestones=rescaled_milestones(self.lr_milestones, self.iterations, iterations))


DETECTION_RECIPES: dict[str, DetectionRecipe] = {
    "voc": DetectionRecipe(name="voc", images_per_batch=1, lr=0.001, iterations=80_000, lr_milestones=(60_000,)),
    "coco": DetectionRecipe(name="coco", images_per_batch=8, lr=0.001, iterations=320_000,
                            lr_milestones=(240_000,), anchor_sizes=(64, 128, 256, 512)),
    "small": DetectionRecipe(name="small", images_per_batch=2, lr=0.02, iterations=3200, lr_milestones=(2560,),
                             weight_decay=1e-4, min_size=128, max_size=192, anchor_sizes=(16, 32, 64, 128),
                             roi_pool_size=4, rpn_pre_nms_train=1000, rpn_post_nms_train=300, rpn_pre_nms_test=500,
                             rpn_post_nms_test=50, rois_per_image=32, box_nms_threshold=0.5),
}


@dataclass(frozen=True)
class DetectionConfig:
    model: str
    data: str
    out: str
    recipe: DetectionRecipe = field(default_factory=lambda: DETECTION_RECIPES["voc"])
    backbone_weights: str | None = None  # None: from scratch (BN trained); else BN frozen
    train_split: str | None = None  # None: the dataset's usual one (COCO train2017, VOC trainval)
    eval_split: str | None = None  # None: COCO val2017, VOC test
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    eval_every: int = 0  # 0: only at the end
    workers: int = 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> DetectionConfig:
        values = dict(values)
        recipe = {key: tuple(value) if isinstance(value, list) else value
                  for key, value in values.pop("recipe").items()}
        return cls(recipe=DetectionRecipe(**recipe), **values)


def resolve_detection_config(recipe: str | None = None, toml_path=None, **overrides) -> DetectionConfig:
    """Preset, TOML file and overrides (None values ignored), checked; keys as in resnetlab.recipes."""
    config = merge_settings(DETECTION_RECIPES, DetectionConfig, recipe, toml_path, overrides)
    validate_detection(config)
    return config


def validate_detection(config: DetectionConfig) -> None:
    from resnetlab.detection.data import parse_detection_spec
    from resnetlab.detection.model import backbone_names

    r = config.recipe
    for name in ("images_per_batch", "iterations", "min_size", "max_size", "roi_pool_size", "rpn_pre_nms_train",
                 "rpn_post_nms_train", "rpn_pre_nms_test", "rpn_post_nms_test", "rpn_batch_size", "rois_per_image",
                 "detections_per_image"):
        check_positive_int(name, getattr(r, name))
    check_positive_float("lr", r.lr)
    check_fraction("momentum", r.momentum, allow_zero=True)
    check_fraction("lr_decay", r.lr_decay)
    check_fraction("box_nms_threshold", r.box_nms_threshold)
    check_fraction("weight_decay", r.weight_decay, allow_zero=True)
    if r.min_size > r.max_size:
        raise ValueError(f"--min-size {r.min_size} must not exceed --max-size {r.max_size}")
    for name in ("anchor_sizes", "aspect_ratios"):
        values = getattr(r, name)
        if not isinstance(values, tuple) or not values or any(not is_real(v) or not v > 0 for v in values):
            raise ValueError(f"--{flag(name)} must be positive numbers, got {values!r}")
    check_milestones(r.lr_milestones)
    if not isinstance(r.flip, bool):
        raise ValueError(f"--flip must be true or false, got {r.flip!r}")
    for name in ("seed", "checkpoint_every", "eval_every", "workers"):
        check_non_negative_int(name, getattr(config, name))
    check_positive_int("log_every", config.log_every)
    if config.device not in DEVICES:
        raise ValueError(f"--device {config.device!r} is not valid; choose one of {', '.join(DEVICES)}")
    if not isinstance(config.out, str) or not config.out:
        raise ValueError(f"--out is required: the directory the run writes into (got {config.out!r})")
    if config.model is None:
        raise ValueError(f"--model is required: the backbone, one of {', '.join(backbone_names())}")
    if config.model not in backbone_names():
        raise ValueError(f"--model {config.model!r} is not a backbone; choose one of {', '.join(backbone_names())}")
    if not isinstance(config.data, str):
        raise ValueError("--data is required: coco:PATH or voc:PATH")
    parse_detection_spec(config.data)


def check_fraction(name: str, value: object, allow_zero: bool = False) -> None:
    above_lower_end = is_real(value) and (value >= 0 if allow_zero else value > 0)
    if not above_lower_end or not value <= 1:
        raise ValueError(f"--{flag(name)} must be in {'[0' if allow_zero else '(0'}, 1], got {value!r}")


DETECTION_KEYS = tuple(f.name for f in fields(DetectionConfig) if f.name != "recipe") + tuple(
    f.name for f in fields(DetectionRecipe) if f.name != "name")
