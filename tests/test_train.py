"""resnetlab.train: what a run writes, determinism, resume, and how it stops on bad states (NaN, an unwritable
--out, a checkpoint of another model). Tiny runs on the 8x8 digits; a short run on the real MNIST checks that
training learns, and the MNIST acceptance run is marked slow."""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import fields, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from run_helpers import (
    assert_same_tensors,
    logged_iterations,
    model_weights,
    read_metrics,
    tiny_config,
    train_until,
    write_png_folder,
)
from safetensors.torch import load_file

import resnetlab.models as models
import resnetlab.train as training
from resnetlab.checkpoint import CheckpointError, load_checkpoint
from resnetlab.cli import main as cli_main
from resnetlab.data import load_dataset
from resnetlab.data.augment import Normalize
from resnetlab.evaluate import class_probabilities, top_k_error
from resnetlab.factory import load_model
from resnetlab.recipes import Recipe, TrainConfig, resolve_config
from resnetlab.runlog import NonFiniteLossError
from resnetlab.train import train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> tuple[TrainConfig, dict]:
    """20 iterations of resnet20 on digits, checkpointed every 10, logged every 5."""
    config = tiny_config(tmp_path_factory.mktemp("run") / "out", iterations=20, checkpoint_every=10, log_every=5)
    return config, train(config, progress=False)


def test_metrics_lines_every_log_every_iterations(finished_run):
    config, summary = finished_run
    records = read_metrics(config.out)
    assert [r["iteration"] for r in records] == [5, 10, 15, 20]
    assert [r["lr"] for r in records] == pytest.approx([0.1, 0.1, 0.01, 0.001], rel=1e-12)  # milestones 10, 15
    for record in records:
        assert {"lr", "train_loss", "train_error", "images_per_second"} <= record.keys()
        assert 0 <= record["train_error"] <= 1 and math.isfinite(record["train_loss"]) and record["train_loss"] > 0
        assert record["images_per_second"] > 0
    assert "test_error" not in records[0]  # evaluated only at the end (eval_every 0)
    assert records[-1]["test_error"] == summary["test_top1_error"]
    assert records[-1]["test_top5_error"] == summary["test_top5_error"]


def test_summary_holds_the_issues_fields_and_the_resolved_recipe(finished_run):
    config, summary = finished_run
    written = json.loads((Path(config.out) / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    assert (written["model"], written["dataset"], written["iterations"]) == ("resnet20", "digits", 20)
    for field in ("train_top1_error", "test_top1_error", "test_top5_error"):
        assert 0 <= written[field] <= 1
    # 20 iterations reach 50-63% test error over seeds 0-4; a net that does not learn (lr 1e-9) stays at 86-93%.
    assert written["test_top5_error"] <= written["test_top1_error"] < 0.75
    assert written["wall_seconds"] > 0
    assert written["images_per_second"] == pytest.approx(20 * 32 / written["wall_seconds"])
    recipe = written["config"]["recipe"]
    assert recipe.keys() == {field.name for field in fields(Recipe)}
    assert {key: recipe[key] for key in ("name", "batch_size", "lr", "momentum", "weight_decay", "iterations",
                                         "lr_milestones")} == {"name": "cifar", "batch_size": 32, "lr": 0.1,
                                                               "momentum": 0.9, "weight_decay": 1e-4,
                                                               "iterations": 20, "lr_milestones": [10, 15]}
    assert TrainConfig.from_dict(written["config"]) == config


def test_summary_errors_are_those_of_the_saved_model(finished_run):
    config, summary = finished_run
    model, state = load_model(config.out)
    data = load_dataset("digits")
    normalize = Normalize.from_state_dict(state["normalize"])
    scores, labels = class_probabilities(model, data.test, normalize, device=torch.device("cpu"))
    assert top_k_error(scores, labels, 1) == pytest.approx(summary["test_top1_error"], abs=1e-6)
    scores, labels = class_probabilities(model, data.train, normalize, device=torch.device("cpu"))
    assert top_k_error(scores, labels, 1) == pytest.approx(summary["train_top1_error"], abs=1e-6)


def test_checkpoint_and_safetensors_hold_the_final_model(finished_run):
    config, _ = finished_run
    state = load_checkpoint(config.out)
    assert (state["iteration"], state["model_name"]) == (20, "resnet20")
    assert state["config"] == config.to_dict() and state["classes"] == [str(d) for d in range(10)]
    assert {"optimizer", "schedule", "rng", "normalize", "elapsed_seconds"} <= state.keys()
    exported = load_file(str(Path(config.out) / "model.safetensors"))
    assert_same_tensors(exported, state["model"])
    assert not list(Path(config.out).glob("*.partial"))


def test_model_follows_the_dataset(finished_run):
    config, _ = finished_run
    state = load_checkpoint(config.out)
    assert state["model_kwargs"] == {"num_classes": 10, "in_channels": 1}
    assert state["model"]["conv1.weight"].shape[1] == 1 and state["model"]["fc.weight"].shape[0] == 10


def test_same_seed_same_weights_other_seed_other_weights(finished_run, tmp_path):
    config, _ = finished_run
    again = train(replace(config, out=str(tmp_path / "again")), progress=False)
    assert_same_tensors(model_weights(tmp_path / "again"), model_weights(config.out))
    assert again["test_top1_error"] == finished_run[1]["test_top1_error"]
    train(replace(config, out=str(tmp_path / "seed1"), seed=1), progress=False)
    other, ours = model_weights(tmp_path / "seed1"), model_weights(config.out)
    assert not torch.equal(other["conv1.weight"], ours["conv1.weight"])


def test_activation_checkpointing_trains_the_same_weights(finished_run, tmp_path, monkeypatch):
    config, _ = finished_run
    stages = []
    checkpointed_stage = models.checkpointed_stage
    monkeypatch.setattr(models, "checkpointed_stage", lambda *args: stages.append(1) or checkpointed_stage(*args))
    summary = train(replace(config, out=str(tmp_path / "out"), activation_checkpointing=True), progress=False)
    assert len(stages) == 3 * config.recipe.iterations  # every stage of every training step was recomputed
    assert summary["config"]["activation_checkpointing"] is True
    assert_same_tensors(model_weights(tmp_path / "out"), model_weights(config.out))


def test_resume_in_process_gives_the_uninterrupted_weights(finished_run, tmp_path):
    config, _ = finished_run
    config = replace(config, out=str(tmp_path / "out"))
    train_until(config, 13)
    assert load_checkpoint(config.out)["iteration"] == 10 and logged_iterations(config.out) == [5, 10]
    train(training.resume_config(config.out), resume=True, progress=False)
    assert_same_tensors(model_weights(config.out), model_weights(finished_run[0].out))
    assert logged_iterations(config.out) == [5, 10, 15, 20]


def test_a_fresh_run_into_an_old_directory_starts_new_metrics(finished_run, tmp_path):
    config, _ = finished_run
    out = tmp_path / "out"
    shutil.copytree(config.out, out)
    train(replace(config, out=str(out), recipe=replace(config.recipe, iterations=10)), progress=False)
    assert logged_iterations(out) == [5, 10]
    assert load_checkpoint(out)["iteration"] == 10


# --------------------------------------------------------------------------------------------------------------
# Stopping on bad states
# --------------------------------------------------------------------------------------------------------------


def poison_loss_at(monkeypatch, iteration: int) -> None:
    """The loss of the given (1-based) iteration becomes NaN, as an overflow would make it."""
    calls = 0

    def cross_entropy(logits, labels):
        nonlocal calls
        calls += 1
        loss = F.cross_entropy(logits, labels)
        return loss * math.nan if calls == iteration else loss

    monkeypatch.setattr(training, "F", SimpleNamespace(cross_entropy=cross_entropy))


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(tmp_path / "out", iterations=20, checkpoint_every=5)
    poison_loss_at(monkeypatch, 8)
    path = Path(config.out) / "checkpoint.pt"
    with pytest.raises(NonFiniteLossError, match=re.escape(
            f"the training loss became nan by iteration 8 (lr 0.1); stopped. {path} holds the last good state")):
        train(config, progress=False)
    assert load_checkpoint(path)["iteration"] == 5
    assert logged_iterations(config.out) == list(range(1, 8))
    assert not (Path(config.out) / "summary.json").exists()
    assert not (Path(config.out) / "model.safetensors").exists()


def test_nan_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    poison_loss_at(monkeypatch, 2)
    with pytest.raises(NonFiniteLossError, match=r"by iteration 2 \(lr 0\.1\); stopped\. no checkpoint had been "):
        train(tiny_config(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


def test_diverging_weights_never_become_a_checkpoint(tmp_path):
    # With a huge lr the BN running variances overflow to inf while the training-mode loss is still finite.
    config = tiny_config(tmp_path / "out", lr=1e10, checkpoint_every=1)
    with pytest.raises(NonFiniteLossError, match=r"became (NaN or inf|nan|inf) (at|by) iteration (\d+)") as error:
        train(config, progress=False)
    failed_at = int(re.search(r"(?:at|by) iteration (\d+)", str(error.value)).group(1))
    state = load_checkpoint(config.out)
    assert state["iteration"] == failed_at - 1
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values() if tensor.is_floating_point())
    assert not (Path(config.out) / "summary.json").exists()


def test_out_under_a_file_fails_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a directory")
    out = tmp_path / "file" / "run"
    monkeypatch.setattr(training, "load_dataset", lambda *a, **kw: pytest.fail("loaded data for an unwritable --out"))
    with pytest.raises(PermissionError, match=f"--out {re.escape(str(out))} is not writable"):
        train(tiny_config(out), progress=False)


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's sysfs")
def test_out_where_not_even_root_may_write_fails_before_any_work(monkeypatch):
    # chmod does not stop root (CI runs as root); the kernel refuses a new directory in sysfs to every user.
    out = Path("/sys/resnetlab-run")
    monkeypatch.setattr(training, "load_dataset", lambda *a, **kw: pytest.fail("loaded data for an unwritable --out"))
    with pytest.raises(PermissionError, match=f"--out {out} is not writable: "):
        train(tiny_config(out), progress=False)


def test_cli_reports_an_unwritable_out(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert cli_main(["train", "--model", "resnet20", "--data", "digits", "--out", str(tmp_path / "file" / "run"),
                     "--quiet"]) == 2
    assert re.fullmatch(r"resnetlab train: error: --out .*/file/run is not writable: .*\n", capsys.readouterr().err)


def test_resuming_with_another_model_names_both(finished_run, tmp_path):
    config, _ = finished_run
    out = tmp_path / "out"
    shutil.copytree(config.out, out)
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(out / 'checkpoint.pt'))} is for model "
                                              f"resnet20, not resnet32"):
        train(replace(config, out=str(out), model="resnet32"), resume=True, progress=False)
    assert (out / "metrics.jsonl").read_bytes() == before


# --------------------------------------------------------------------------------------------------------------
# Image folders and the real MNIST
# --------------------------------------------------------------------------------------------------------------


def test_folder_training_runs_and_reports_skipped_files(tmp_path):
    write_png_folder(tmp_path / "images")
    config = tiny_config(tmp_path / "out", data=f"folder:{tmp_path / 'images'}", iterations=2, batch_size=4,
                         workers=0, eval_batch_size=8)
    summary = train(config, progress=False)
    assert "skipped 2 unreadable files" in summary["data_note"]
    assert "8 train / 2 test" in summary["data_note"]
    state = load_checkpoint(config.out)
    assert state["model_kwargs"] == {"num_classes": 2, "in_channels": 3}
    assert state["classes"] == ["class0", "class1"] and state["iteration"] == 2
    assert 0 <= summary["test_top1_error"] <= 1 and summary["test_top5_error"] == 0  # 2 classes: top-5 never misses


def test_resnet20_learns_real_mnist_in_100_iterations(shared_data, tmp_path):
    # The default run's check that training learns: seeds 0-2 reach 8.6-9.3% test error at this budget; a net that
    # does not learn stays near chance (88.65%: always answering the commonest digit of the 2,000 test images).
    config = resolve_config(model="resnet20", data=f"mnist:{shared_data / 'mnist'}", out=str(tmp_path / "out"),
                            iterations=100, batch_size=64, train_eval_size=500)
    summary = train(config, progress=False)
    assert summary["test_top1_error"] < 0.2, summary


@pytest.mark.slow
def test_resnet20_on_real_mnist_reaches_3_percent(shared_data, tmp_path):
    out = tmp_path / "r20"
    assert cli_main(["train", "--model", "resnet20", "--data", f"mnist:{shared_data / 'mnist'}", "--iterations", "300",
                     "--out", str(out), "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "8,000 train / 2,000 test" in summary["data_note"]
    assert summary["test_top1_error"] <= 0.03, summary


@pytest.mark.parametrize("warms_up", [False, True])
def test_the_loop_reads_the_loss_only_at_log_points_unless_a_deep_net_warms_up(tmp_path, monkeypatch, warms_up):
    """Reading a loss waits for the device: between log points the loop must not, except during a warm-up, whose
    lr depends on each batch's error. Every read goes through mean_over_processes (the all-reduce when distributed)."""
    reads = []
    mean = training.distributed.mean_over_processes
    monkeypatch.setattr(training.distributed, "mean_over_processes",
                        lambda values, context: reads.append(len(values)) or mean(values, context))
    warm_up = {"warmup_min_depth": 20, "warmup_until_error": 1e-9} if warms_up else {}  # a warm-up that never ends
    train(tiny_config(tmp_path / "out", iterations=20, log_every=10, **warm_up), progress=False)
    assert len(reads) == (20 + 2 if warms_up else 2)
    assert [line["iteration"] for line in read_metrics(tmp_path / "out")] == [10, 20]
