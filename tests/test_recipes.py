"""resnetlab.recipes and the lr schedule: the paper's presets as data, their overrides (TOML file, then flags),
the rejection of out-of-range settings before any work, and the learning rate of every iteration."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
from dataclasses import asdict, replace

import pytest
from run_helpers import read_metrics, tiny_config

import resnetlab.train as training
from resnetlab import recipes, runlog
from resnetlab.cli import add_train_arguments, build_parser
from resnetlab.cli import main as cli_main
from resnetlab.recipes import RECIPE_KEYS, RECIPES, RUN_KEYS, TrainConfig, flag, resolve_config
from resnetlab.schedule import LrSchedule
from resnetlab.train import prepare


def test_cifar_preset_is_the_papers_section_4_2():
    cifar = RECIPES["cifar"]
    assert (cifar.batch_size, cifar.lr, cifar.momentum, cifar.weight_decay) == (128, 0.1, 0.9, 1e-4)
    assert (cifar.lr_milestones, cifar.iterations, cifar.lr_decay) == ((32_000, 48_000), 64_000, 0.1)
    assert (cifar.warmup_min_depth, cifar.warmup_lr, cifar.warmup_until_error) == (110, 0.01, 0.8)
    assert (cifar.padding, cifar.plateau_patience) == (4, 0)


def test_imagenet_preset_is_the_papers_section_3_4():
    imagenet = RECIPES["imagenet"]
    assert (imagenet.batch_size, imagenet.lr, imagenet.momentum, imagenet.weight_decay) == (256, 0.1, 0.9, 1e-4)
    assert (imagenet.iterations, imagenet.lr_milestones) == (600_000, ())
    assert imagenet.plateau_patience > 0 and imagenet.warmup_min_depth == 0


def test_with_iterations_keeps_the_milestones_in_place():
    short = RECIPES["cifar"].with_iterations(300)
    assert (short.iterations, short.lr_milestones) == (300, (150, 225))
    assert replace(short, iterations=64_000, lr_milestones=(32_000, 48_000)) == RECIPES["cifar"]
    assert resolve_config(model="resnet20", data="digits", out="x", iterations=300).recipe == short


def test_lr_drops_tenfold_at_each_milestone():
    schedule = LrSchedule(RECIPES["cifar"].with_iterations(300), warm_up=False)
    assert schedule.lr(0) == schedule.lr(149) == 0.1
    assert schedule.lr(150) == schedule.lr(224) == pytest.approx(0.01, rel=1e-12)
    assert schedule.lr(225) == schedule.lr(299) == pytest.approx(0.001, rel=1e-12)


def test_warm_up_at_0_01_until_the_smoothed_training_error_is_below_80_percent():
    schedule = LrSchedule(RECIPES["cifar"], warm_up=True)
    assert schedule.lr(0) == 0.01
    # The error is smoothed (0.9 old + 0.1 new, from 1.0), so one lucky batch does not end the warm-up:
    # constant 50% errors bring it to 0.95, 0.905, 0.8645, 0.82805, 0.795245.
    for _ in range(4):
        schedule.observe_batch_error(0.5)
        assert schedule.lr(1) == 0.01
    schedule.observe_batch_error(0.5)
    assert schedule.train_error_ema == pytest.approx(0.795245)
    assert schedule.lr(1) == 0.1
    schedule.observe_batch_error(1.0)  # the warm-up never comes back
    assert schedule.lr(1) == 0.1


def test_a_ramp_raises_the_lr_linearly_to_its_value_then_the_milestones_apply():
    recipe = replace(RECIPES["imagenet"], iterations=800, lr_milestones=(400, 600), plateau_patience=0,
                     ramp_iterations=160)
    schedule = LrSchedule(recipe, warm_up=False)
    assert [schedule.lr(i) for i in (0, 79, 158)] == pytest.approx([0.1 / 160, 0.05, 0.1 * 159 / 160])
    assert schedule.lr(159) == schedule.lr(399) == 0.1
    assert schedule.lr(400) == pytest.approx(0.01) and schedule.lr(600) == pytest.approx(0.001)
    assert RECIPES["imagenet"].ramp_iterations == RECIPES["cifar"].ramp_iterations == 0  # not in the paper
    with pytest.raises(ValueError, match="--ramp-iterations must be"):
        resolve_config("imagenet", model="resnet18", data="digits", out="x", ramp_iterations=-1)


@pytest.mark.parametrize(("model", "recipe", "warms_up"), [
    ("resnet110", "cifar", True), ("resnet56", "cifar", False), ("resnet110", "imagenet", False)])
def test_only_110_layers_and_deeper_warm_up(tmp_path, model, recipe, warms_up):
    run = prepare(tiny_config(tmp_path, model=model, recipe=recipe), resume=False)
    assert run.schedule.warming_up is warms_up
    assert run.schedule.lr(0) == (0.01 if warms_up else 0.1)


def test_plateau_drops_after_patience_evaluations_without_improvement():
    recipe = RECIPES["imagenet"]
    assert recipe.plateau_patience == 3
    schedule = LrSchedule(recipe, warm_up=False)
    for error in (0.50, 0.40, 0.45, 0.40, 0.41):  # a new best, then 3 evaluations that do not beat 0.40
        assert schedule.lr(10**5) == 0.1
        schedule.observe_validation_error(error)
    assert schedule.lr(10**5) == pytest.approx(0.01, rel=1e-12)
    for error in (0.30, 0.31, 0.32):  # an improvement restarts the count
        schedule.observe_validation_error(error)
    assert schedule.lr(10**5) == pytest.approx(0.01, rel=1e-12)
    schedule.observe_validation_error(0.30)
    assert schedule.lr(10**5) == pytest.approx(0.001, rel=1e-12)


def test_cifar_recipe_ignores_the_validation_error():
    schedule = LrSchedule(RECIPES["cifar"], warm_up=False)
    for _ in range(10):
        schedule.observe_validation_error(0.9)
    assert schedule.lr(0) == 0.1


def test_schedule_state_round_trips():
    schedule = LrSchedule(RECIPES["imagenet"], warm_up=True)
    for error in (0.3, 0.9, 0.9, 0.9):
        schedule.observe_validation_error(error)
        schedule.observe_batch_error(error)
    copy = LrSchedule(RECIPES["imagenet"], warm_up=True)
    copy.load_state_dict(schedule.state_dict())
    assert copy.state_dict() == schedule.state_dict() and copy.plateau_drops == 1


# --------------------------------------------------------------------------------------------------------------
# TOML files and flags
# --------------------------------------------------------------------------------------------------------------


def write_toml(tmp_path, text: str):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_toml_flat_keys_and_recipe_table(tmp_path):
    path = write_toml(tmp_path, 'model = "resnet32"\ndata = "digits"\nout = "runs/a"\nseed = 7\n'
                                "precision = \"bf16\"\n\n[recipe]\niterations = 300\nbatch_size = 64\nlr = 0.05\n"
                                "lr_milestones = [100, 200]\n")
    config = resolve_config("cifar", path)
    assert (config.model, config.data, config.out, config.seed, config.precision) == (
        "resnet32", "digits", "runs/a", 7, "bf16")
    assert config.recipe == replace(RECIPES["cifar"], iterations=300, batch_size=64, lr=0.05,
                                    lr_milestones=(100, 200))


def test_toml_can_pick_the_preset_and_its_iterations_rescale_the_milestones(tmp_path):
    path = write_toml(tmp_path, 'recipe = "imagenet"\nmodel = "resnet18"\ndata = "digits"\nout = "o"\n')
    assert resolve_config(None, path).recipe == RECIPES["imagenet"]
    assert resolve_config("cifar", path).recipe == RECIPES["cifar"]  # the flag wins over the file
    path = write_toml(tmp_path, 'model = "resnet20"\ndata = "digits"\nout = "o"\niterations = 640\n')
    assert resolve_config("cifar", path).recipe.lr_milestones == (320, 480)


def test_flags_override_the_toml_file(tmp_path):
    path = write_toml(tmp_path, 'model = "resnet32"\ndata = "digits"\nout = "o"\nlr = 0.05\nseed = 7\n')
    config = resolve_config("cifar", path, model="resnet20", lr=0.2, seed=None)  # None: flag not given
    assert (config.model, config.recipe.lr, config.seed) == ("resnet20", 0.2, 7)


def test_flags_override_the_toml_file_through_the_cli(tmp_path, capsys):
    path = write_toml(tmp_path, 'model = "resnet20"\ndata = "digits"\nlr = 0.05\nbatch_size = 16\niterations = 4\n'
                                "log_every = 1\n")
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(path), "--out", str(out), "--lr", "0.3", "--quiet"]) == 0
    recipe = json.loads((out / "summary.json").read_text())["config"]["recipe"]
    assert (recipe["lr"], recipe["batch_size"], recipe["lr_milestones"]) == (0.3, 16, [2, 3])
    assert [record["lr"] for record in read_metrics(out)] == pytest.approx([0.3, 0.3, 0.03, 0.003], rel=1e-12)
    assert "resnet20 on digits: 4 iterations" in capsys.readouterr().out


def test_the_recipe_flag_beats_the_toml_files_recipe_through_the_cli(tmp_path):
    path = write_toml(tmp_path, 'recipe = "imagenet"\nmodel = "resnet20"\ndata = "digits"\niterations = 2\n'
                                "batch_size = 8\n")
    for flags, preset in (([], "imagenet"), (["--recipe", "cifar"], "cifar")):
        out = tmp_path / preset
        assert cli_main(["train", "--config", str(path), "--out", str(out), *flags, "--quiet"]) == 0
        recipe = json.loads((out / "summary.json").read_text())["config"]["recipe"]
        assert (recipe["name"], recipe["batch_size"], recipe["iterations"]) == (preset, 8, 2)


def test_fine_tuning_settings_from_toml_and_a_path_object(tmp_path):
    path = write_toml(tmp_path, 'model = "resnet18"\ndata = "digits"\nout = "o"\ninit = "runs/imagenet"\n'
                                "freeze_backbone = true\ntensorboard = true\n")
    config = resolve_config("cifar", path)
    assert (config.init, config.freeze_backbone, config.tensorboard) == ("runs/imagenet", True, True)
    config = resolve_config(model="resnet18", data="digits", out="o", init=tmp_path / "resnet18.pth")
    assert config.init == str(tmp_path / "resnet18.pth")  # a string, as the checkpoint and summary.json store it


def test_unknown_key_lists_the_valid_ones(tmp_path):
    path = write_toml(tmp_path, 'model = "resnet20"\nlearning_rate = 0.1\n')
    with pytest.raises(ValueError, match=r"unknown setting\(s\) learning_rate; valid: ") as error:
        resolve_config("cifar", path)
    assert all(key in str(error.value) for key in RUN_KEYS + RECIPE_KEYS)
    with pytest.raises(ValueError, match="unknown setting.*bogus"):
        resolve_config(model="resnet20", data="digits", out="o", bogus=1)


def test_bad_toml_names_the_file(tmp_path):
    path = write_toml(tmp_path, "lr = = 0.1\n")
    with pytest.raises(ValueError, match=f"config file {re.escape(str(path))} is not valid TOML"):
        resolve_config("cifar", path)
    path.write_bytes(b"lr = \xff\n")
    with pytest.raises(ValueError, match=f"config file {re.escape(str(path))} is not valid TOML"):
        resolve_config("cifar", path)
    with pytest.raises(FileNotFoundError, match="config file .*missing.toml does not exist"):
        resolve_config("cifar", tmp_path / "missing.toml")


# --------------------------------------------------------------------------------------------------------------
# Out-of-range settings: rejected before any work, naming the flag
# --------------------------------------------------------------------------------------------------------------

BAD_SETTINGS = [
    ({"iterations": -5}, "--iterations must be a positive integer, got -5"),
    ({"iterations": 0}, "--iterations must be a positive integer, got 0"),
    ({"batch_size": 0}, "--batch-size must be a positive integer, got 0"),
    ({"lr": math.nan}, "--lr must be a finite number > 0, got nan"),
    ({"lr": math.inf}, "--lr must be a finite number > 0, got inf"),
    ({"lr": 0.0}, "--lr must be a finite number > 0, got 0.0"),
    ({"momentum": -0.9}, "--momentum must be a finite number >= 0, got -0.9"),
    ({"weight_decay": math.nan}, "--weight-decay must be a finite number >= 0, got nan"),
    ({"precision": "fp16"}, "--precision 'fp16' is not valid; choose one of fp32, bf16"),
    ({"device": "tpu"}, "--device 'tpu' is not valid; choose one of auto, cpu, cuda"),
    ({"checkpoint_every": -1}, "--checkpoint-every must be an integer >= 0, got -1"),
    ({"log_every": 0}, "--log-every must be a positive integer, got 0"),
    ({"seed": -1}, "--seed must be an integer >= 0, got -1"),
    ({"model": "resnet21"}, "--model 'resnet21' is not a named model; choose one of "),
    ({"data": "svhn:/data"}, "unknown dataset 'svhn:/data': valid kinds are cifar10:PATH"),
    ({"init": 3}, "--init must be a path (a run directory, checkpoint.pt, model.safetensors or a .pth state_dict), "
                  "got 3"),
    ({"init": ""}, "--init must be a path (a run directory, checkpoint.pt, model.safetensors or a .pth state_dict), "
                   "got ''"),
    ({"freeze_backbone": True}, "--freeze-backbone needs --init: only loaded weights are worth freezing"),
    ({"freeze_backbone": "yes", "init": "runs/x"}, "--freeze-backbone must be true or false, got 'yes'"),
    ({"tensorboard": 1}, "--tensorboard must be true or false, got 1"),
    ({"resolution": 0.0}, "--resolution must be a finite number > 0, got 0.0"),
    ({"resolution": 0.1}, "--resolution 0.1 makes 22-pixel crops; the ImageNet networks need at least 32"),
    ({"test_eval_size": 0}, "--test-eval-size must be a positive integer, got 0"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_SETTINGS)
def test_out_of_range_settings_name_the_flag(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_config(**{"model": "resnet20", "data": "digits", "out": "o", **overrides})


def test_unknown_recipe_lists_the_presets():
    with pytest.raises(ValueError, match="--recipe .cifar11. is not a preset; choose one of cifar, imagenet"):
        resolve_config("cifar11", model="resnet20", data="digits", out="o")


def cli_rejects(tmp_path, monkeypatch, capsys, args: list[str]) -> str:
    """Run `resnetlab train ARGS` and return its stderr, checking that it failed before doing anything."""
    calls = []
    monkeypatch.setattr(training, "train", lambda *a, **kw: calls.append(a))
    out = tmp_path / "run"
    assert cli_main(["train", "--model", "resnet20", "--data", "digits", "--out", str(out), "--quiet", *args]) == 2
    assert calls == [] and not out.exists()
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    return captured.err


@pytest.mark.parametrize(("args", "message"), [
    (["--iterations", "-5"], "--iterations must be a positive integer, got -5"),
    (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "--lr must be a finite number > 0, got 0.0"),
    (["--precision", "fp16"], "--precision 'fp16' is not valid; choose one of fp32, bf16"),
    (["--recipe", "cifar11"], "--recipe 'cifar11' is not a preset"),
    (["--model", "resnet21"], "--model 'resnet21' is not a named model"),
    (["--freeze-backbone"], "--freeze-backbone needs --init"),
])
def test_cli_rejects_out_of_range_arguments_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    err = cli_rejects(tmp_path, monkeypatch, capsys, args)
    assert err.startswith("resnetlab train: error: ") and message in err


def test_cli_names_a_missing_data_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training, "train", lambda *a, **kw: pytest.fail("trained without --data"))
    assert cli_main(["train", "--model", "resnet20", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "Traceback" not in err and not (tmp_path / "run").exists()


def every_parser(parser: argparse.ArgumentParser):
    """`parser` and its subcommands' parsers, theirs too (detect's actions)."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                yield from every_parser(subparser)


def test_no_parser_matches_a_flag_by_its_prefix():
    parsers = list(every_parser(build_parser()))
    assert {"resnetlab", "resnetlab train", "resnetlab detect", "resnetlab detect train"} <= {p.prog for p in parsers}
    assert all(parser.allow_abbrev is False for parser in parsers), [p.prog for p in parsers if p.allow_abbrev]


@pytest.mark.parametrize(("argv", "named"), [
    (["detect", "train", "--backbone", "resnet18"], "--backbone resnet18"),  # was taken as --backbone-weights
    (["train", "--model", "resnet20", "--iter", "3"], "--iter 3"),
    (["evaluate", "runs/x", "--prec", "int8"], "--prec int8"),
])
def test_a_shortened_flag_is_an_error_that_names_it(capsys, argv, named):
    with pytest.raises(SystemExit) as exit:
        cli_main(argv)
    assert exit.value.code == 2
    assert f"error: unrecognized arguments: {named}\n" in capsys.readouterr().err


def test_config_round_trips_through_its_dict():
    config = resolve_config(model="resnet20", data="digits", out="o", iterations=300, seed=3)
    assert asdict(config)["recipe"]["lr_milestones"] == (150, 225)
    assert type(config).from_dict(config.to_dict()) == config


def test_a_config_stored_with_the_removed_augment_setting_still_loads():
    config = resolve_config(model="resnet20", data="digits", out="o")
    stored = config.to_dict()
    stored["recipe"]["augment"] = "crop_flip"  # what runs stored while the (inert) setting existed
    assert TrainConfig.from_dict(stored) == config


def test_every_flag_a_message_names_is_a_train_flag():
    """recipes.validate names any setting as its flag, train.resume_config names the ones that may change, and
    they and runlog name some literally: each must be a flag of `resnetlab train`."""
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    flags = set(re.findall(r"--[a-z][a-z-]*[a-z]", parser.format_help()))
    named = {f"--{flag(key)}" for key in RUN_KEYS + RECIPE_KEYS}
    for module in (recipes, training, runlog):
        named |= set(re.findall(r"--[a-z][a-z-]*[a-z]", inspect.getsource(module)))
    assert "--lr-milestones" in named and named - flags == set()


def test_the_recipe_flags_reach_the_run(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", "--model", "resnet20", "--data", "digits", "--out", str(out), "--batch-size", "16",
                     "--iterations", "4", "--log-every", "1", "--lr-milestones", "1,3", "--lr-decay", "0.5",
                     "--padding", "0", "--plateau-patience", "2", "--warmup-min-depth", "56", "--warmup-lr", "0.02",
                     "--warmup-until-error", "0.5", "--eval-batch-size", "100", "--train-eval-size", "50",
                     "--quiet"]) == 0
    config = TrainConfig.from_dict(json.loads((out / "summary.json").read_text())["config"])
    assert config.recipe == replace(RECIPES["cifar"], iterations=4, batch_size=16, lr_milestones=(1, 3), lr_decay=0.5,
                                    padding=0, plateau_patience=2, warmup_min_depth=56, warmup_lr=0.02,
                                    warmup_until_error=0.5)
    assert (config.eval_batch_size, config.train_eval_size) == (100, 50)
    assert [record["lr"] for record in read_metrics(out)] == pytest.approx([0.1, 0.05, 0.05, 0.025], rel=1e-12)
