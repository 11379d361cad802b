"""The paper's training recipes as data, and the settings of one run.

A `Recipe` is what the paper specifies (Sec. 3.4 for ImageNet, Sec. 4.2 for CIFAR); a `TrainConfig` is one run:
a recipe plus the model, the data, where to write, and how to compute (precision, layout, device). Both are plain
dataclasses, so printing one shows everything a run used, and summary.json stores it whole.

Resolution order, later wins: the preset named by `recipe`, then a TOML file, then command-line flags.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from resnetlab.data.augment import ImageSizes
from resnetlab.data.spec import SPEC_FORMS, DatasetSpec
from resnetlab.models import MODELS, SHORTCUTS
from resnetlab.precision import Precision, check_precision

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

DEVICES = ("auto", "cpu", "cuda")
MIN_CROP = 32  # the ImageNet networks divide their input by 32


@dataclass(frozen=True)
class Recipe:
    """The augmentation is not a setting: it follows the data (train.training_batches). In-memory arrays are padded
    by `padding`, randomly cropped and flipped (Sec. 4.2); image folders get the scale augmentation (Sec. 3.4)."""

    name: str
    batch_size: int
    lr: float
    iterations: int
    lr_milestones: tuple[int, ...]  # the lr is multiplied by lr_decay at each of these iterations
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_decay: float = 0.1
    # ImageNet: "the learning rate is divided by 10 when the error plateaus": after this many evaluations
    # without a new best validation error (0 = off).
    plateau_patience: int = 0
    # CIFAR, 110 layers and deeper: "we use 0.01 to warm up the training until the training error is below 80%".
    warmup_min_depth: int = 0  # 0 = no warm-up
    warmup_lr: float = 0.01
    warmup_until_error: float = 0.8
    # Not in the paper: the lr rises linearly to `lr` over this many first iterations (Goyal et al., 2017). At lr 0.1
    # an option-A ImageNet ResNet's first steps blow up (loss 9, then slow learning for the rest of a short run);
    # a 600k-iteration run forgets that, a run of hundreds does not (docs/reproduction.md). 0: off.
    ramp_iterations: int = 0
    padding: int = 4  # pixels at 32x32 (smaller images in proportion, data.batches.padding_for)
    per_channel_std: bool = False  # the paper subtracts the per-pixel mean only
    # Image folders: every image size of Sec. 3.4 times this (data.augment.ImageSizes): 0.5 trains 112x112 crops of
    # images resized to a shorter side in [128, 240] and validates on 112 of 128, so the ImageNet networks train on a
    # small machine in the paper's proportions.
    resolution: float = 1.0

    def with_iterations(self, iterations: int) -> Recipe:
        """The same recipe over `iterations`: the lr milestones keep their place relative to the end."""
        return replace(self, iterations=iterations,
                       lr_milestones=rescaled_milestones(self.lr_milestones, self.iterations, iterations))


def rescaled_milestones(milestones: tuple[int, ...], old_iterations: int, iterations: int) -> tuple[int, ...]:
    """The milestones of a schedule of `old_iterations` moved to the same place relative to `iterations`."""
    check_positive_int("iterations", iterations)
    return tuple(max(1, round(m * iterations / old_iterations)) for m in milestones)


RECIPES: dict[str, Recipe] = {
    "cifar": Recipe(name="cifar", batch_size=128, lr=0.1, iterations=64_000, lr_milestones=(32_000, 48_000),
                    warmup_min_depth=110),
    "imagenet": Recipe(name="imagenet", batch_size=256, lr=0.1, iterations=600_000, lr_milestones=(),
                       plateau_patience=3),
}


# Settings that change how a run is computed (where, how fast), not what it computes: a run trained on a GPU with
# --cuda-graphs is the same experiment run as one trained on the CPU.
COMPUTE_KEYS = ("device", "compile", "cuda_graphs", "channels_last", "workers", "eval_batch_size", "tensorboard")


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: str
    out: str
    recipe: Recipe = field(default_factory=lambda: RECIPES["cifar"])
    seed: int = 0
    val_size: int = 0  # training images held out for validation (the paper's CIFAR split: 5000)
    shortcut: str | None = None  # None: the model's default (A for CIFAR nets, B for ImageNet nets)
    precision: Precision = "fp32"
    channels_last: bool = True
    compile: bool = False
    cuda_graphs: bool = False  # replay forward and backward as CUDA graphs: small nets stop waiting on kernel launches
    device: str = "auto"
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    checkpoint_every: int = 0  # 0: checkpoint only at the end
    eval_batch_size: int = 500
    train_eval_size: int = 10_000  # the final training error is measured on at most this many training images
    test_eval_size: int | None = None  # held-out (val, test) images evaluated; None: all of them
    workers: int = 2  # DataLoader processes for image-folder data
    download: bool = False
    sync_bn: bool = False  # distributed runs: batch statistics over all processes
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~1 more forward
    init: str | None = None  # start from these weights: a run directory, checkpoint.pt, .safetensors or .pth file
    freeze_backbone: bool = False  # train fc alone (needs init); BN statistics stay as loaded
    tensorboard: bool = False  # also write the metrics as TensorBoard scalars under OUT/tb

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        recipe = values.pop("recipe")
        # Runs written before the inert `augment` setting was removed stored it; it never changed what they did.
        recipe = {key: value for key, value in recipe.items() if key != "augment"}
        recipe = Recipe(**{**recipe, "lr_milestones": tuple(recipe["lr_milestones"])})
        return cls(recipe=recipe, **values)


def recorded_data(state: dict) -> str | None:
    """The dataset spec a checkpoint's run trained on (None for files that record none: other projects' weights)."""
    return state.get("config", {}).get("data")


def trained_on_image_folder(state: dict) -> bool:
    """Whether a checkpoint's run trained on crops of an image folder's photographs (the ImageNet recipe)."""
    spec = recorded_data(state)
    return bool(spec) and DatasetSpec.parse(spec).kind == "folder"


def recorded_resolution(state: dict) -> float:
    """The image resolution factor a checkpoint's run trained at (1 for runs from before the setting existed)."""
    return state.get("config", {}).get("recipe", {}).get("resolution", 1.0)


RUN_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "recipe")
RECIPE_KEYS = tuple(f.name for f in fields(Recipe) if f.name != "name")


def resolve_config(recipe: str | None = None, toml_path: str | Path | None = None, **overrides) -> TrainConfig:
    """Build a TrainConfig from a preset, a TOML file and overrides (None values are ignored): flags beat the TOML
    file, which beats the preset (`recipe`, else the TOML file's `recipe`, else cifar).

    The TOML file and the overrides take the same keys: any TrainConfig field and any Recipe field; the TOML file
    may also name the preset. Changing `iterations` rescales the lr milestones unless they are given too.
    """
    config = merge_settings(RECIPES, TrainConfig, recipe, toml_path, overrides)
    validate(config)
    return config


def merge_settings(presets: dict, config_class: type, recipe: str | None, toml_path: str | Path | None,
                   overrides: dict):
    """A `config_class` (a dataclass with a `recipe` field, like TrainConfig) from a preset, the TOML file's settings
    and the overrides, each winning over the one before; not yet validated. The preset is `recipe` when given (the
    --recipe flag), else the TOML file's `recipe`, else the first of `presets`."""
    values: dict = {}
    if toml_path is not None:
        values.update(read_toml(toml_path))
    toml_recipe = values.pop("recipe", next(iter(presets)))
    values.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("out", "init"):  # paths are stored as strings: the config goes into JSON and checkpoints
        if isinstance(values.get(key), os.PathLike):
            values[key] = os.fspath(values[key])
    preset_name = recipe if recipe is not None else toml_recipe
    if not isinstance(preset_name, str) or preset_name not in presets:
        raise ValueError(f"--recipe {preset_name!r} is not a preset; choose one of {', '.join(presets)}")
    chosen = presets[preset_name]
    run_keys = tuple(f.name for f in fields(config_class) if f.name != "recipe")
    recipe_keys = tuple(f.name for f in fields(chosen) if f.name != "name")
    unknown = sorted(set(values) - set(run_keys) - set(recipe_keys))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; valid: {', '.join(run_keys + recipe_keys)}")
    recipe_values = {k: values.pop(k) for k in recipe_keys if k in values}
    if "iterations" in recipe_values:
        chosen = chosen.with_iterations(recipe_values.pop("iterations"))
    for key, value in recipe_values.items():  # TOML arrays are lists; validation checks the rest
        if isinstance(value, list):
            recipe_values[key] = tuple(value)
    missing = {name: None for name in ("model", "data", "out")}  # validation names the ones still None
    return config_class(recipe=replace(chosen, **recipe_values), **{**missing, **values})


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with path.open("rb") as file:
            content = tomllib.load(file)
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"config file {path} is not valid TOML: {error}") from None
    # A [recipe] table is allowed too, for readability: its keys are recipe fields.
    table = content.pop("recipe", None)
    if isinstance(table, dict):
        content.update(table)
    elif table is not None:
        content["recipe"] = table
    return content


def validate(config: TrainConfig) -> None:
    """Reject out-of-range settings before any work, naming the setting as its command-line flag."""
    r = config.recipe
    for name in ("batch_size", "iterations"):
        check_positive_int(name, getattr(r, name))
    for name in ("lr", "warmup_lr", "resolution"):
        check_positive_float(name, getattr(r, name))
    for name in ("momentum", "weight_decay"):
        value = getattr(r, name)
        if not is_real(value) or not math.isfinite(value) or value < 0:
            raise ValueError(f"--{flag(name)} must be a finite number >= 0, got {value!r}")
    for name in ("lr_decay", "warmup_until_error"):
        value = getattr(r, name)
        if not is_real(value) or not 0 < value <= 1:
            raise ValueError(f"--{flag(name)} must be in (0, 1], got {value!r}")
    if ImageSizes.scaled(r.resolution).crop < MIN_CROP:
        raise ValueError(f"--resolution {r.resolution:g} makes {ImageSizes.scaled(r.resolution).crop}-pixel crops; "
                         f"the ImageNet networks need at least {MIN_CROP} (resolution >= {MIN_CROP / 224:.3f})")
    check_milestones(r.lr_milestones)
    for name in ("plateau_patience", "warmup_min_depth", "padding", "ramp_iterations"):
        check_non_negative_int(name, getattr(r, name))
    check_precision(config.precision, training=True)
    if config.device not in DEVICES:
        raise ValueError(f"--device {config.device!r} is not valid; choose one of {', '.join(DEVICES)}")
    for name in ("seed", "val_size", "eval_every", "checkpoint_every", "workers"):
        check_non_negative_int(name, getattr(config, name))
    if config.seed >= 2**32:  # the data streams derive torch generator seeds from it, which must fit 64 bits
        raise ValueError(f"--seed must be below 2**32, got {config.seed}")
    for name in ("log_every", "eval_batch_size", "train_eval_size"):
        check_positive_int(name, getattr(config, name))
    if config.test_eval_size is not None:
        check_positive_int("test_eval_size", config.test_eval_size)
    for owner, name in ((config, "channels_last"), (config, "compile"), (config, "cuda_graphs"), (config, "download"),
                        (config, "sync_bn"), (config, "activation_checkpointing"), (config, "freeze_backbone"),
                        (config, "tensorboard"), (r, "per_channel_std")):
        if not isinstance(getattr(owner, name), bool):
            raise ValueError(f"--{flag(name)} must be true or false, got {getattr(owner, name)!r}")
    if config.cuda_graphs and (config.compile or config.precision != "fp32" or config.activation_checkpointing):
        raise ValueError("--cuda-graphs works alone: not with --compile, --activation-checkpointing or a --precision "
                         "other than fp32")
    if config.init is not None and (not isinstance(config.init, str) or not config.init):
        raise ValueError(f"--init must be a path (a run directory, checkpoint.pt, model.safetensors or a .pth "
                         f"state_dict), got {config.init!r}")
    if config.freeze_backbone and config.init is None:
        raise ValueError("--freeze-backbone needs --init: only loaded weights are worth freezing")
    if config.shortcut not in (None, *SHORTCUTS):
        raise ValueError(f"--shortcut {config.shortcut!r} is not valid; choose one of {', '.join(SHORTCUTS)}")
    if not isinstance(config.out, str) or not config.out:
        raise ValueError(f"--out is required: the directory the run writes into, as a string (got {config.out!r})")
    if not isinstance(config.model, str) or config.model not in MODELS:
        raise ValueError(f"--model {config.model!r} is not a named model; choose one of {', '.join(MODELS)}")
    if not isinstance(config.data, str):
        raise ValueError(f"--data is required: a dataset spec, one of {SPEC_FORMS}")
    DatasetSpec.parse(config.data)  # names the valid dataset kinds


def check_milestones(milestones: object) -> None:
    if (not isinstance(milestones, tuple) or any(isinstance(m, bool) or not isinstance(m, int) or m < 1
                                                 for m in milestones) or list(milestones) != sorted(milestones)):
        raise ValueError(f"--lr-milestones must be increasing positive iterations, got {milestones!r}")


def flag(name: str) -> str:
    return name.replace("_", "-")


def is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"--{flag(name)} must be a positive integer, got {value!r}")


def check_non_negative_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"--{flag(name)} must be an integer >= 0, got {value!r}")


def check_positive_float(name: str, value: object) -> None:
    if not is_real(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"--{flag(name)} must be a finite number > 0, got {value!r}")
