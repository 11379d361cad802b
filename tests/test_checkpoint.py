"""resnetlab.checkpoint at the unit level: what save_checkpoint puts on disk and the order in which it makes it
durable, what load_checkpoint and load_model give back, a failed save, and the safetensors export.

Covered elsewhere and not repeated here: damaged bytes and a pickle payload (test_bad_input.py), SIGKILL during a
write, a full disk and a checkpoint of another model on resume (test_faults.py, test_train.py)."""

from __future__ import annotations

import os
import pickle
import stat
import zipfile

import pytest
import torch
from run_helpers import assert_same_tensors
from safetensors import safe_open
from safetensors.torch import load_file

from resnetlab.checkpoint import (
    FORMAT,
    checkpoint_path,
    export_safetensors,
    load_checkpoint,
    save_checkpoint,
)
from resnetlab.factory import create_model, load_model

KWARGS = {"num_classes": 3, "in_channels": 1}


def model_state() -> dict:
    torch.manual_seed(0)
    model = create_model("resnet20", **KWARGS)
    model(torch.randn(4, 1, 8, 8))  # training-mode forward: the BN running statistics move away from 0 and 1
    return {"model_name": "resnet20", "model_kwargs": KWARGS, "classes": ["a", "b", "ç"],
            "model": model.state_dict(), "iteration": 7, "elapsed_seconds": 1.5, "best_error": float("inf"),
            "rng": {"torch": torch.get_rng_state()}, "half": torch.arange(4, dtype=torch.bfloat16),
            "config": {"seed": 0, "shortcut": None, "compile": False, "milestones": [1, 2]}}


def test_round_trip_gives_back_every_entry_and_leaves_only_the_file(tmp_path):
    state = model_state()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(state, path)
    assert [entry.name for entry in tmp_path.iterdir()] == ["checkpoint.pt"]  # no .partial left behind
    assert path.read_bytes()[:4] == b"PK\x03\x04" and zipfile.ZipFile(path).testzip() is None
    loaded = load_checkpoint(path)
    assert loaded.pop("format") == FORMAT
    assert_same_tensors(loaded.pop("model"), state["model"])
    assert torch.equal(loaded.pop("rng")["torch"], state["rng"]["torch"])
    half = loaded.pop("half")
    assert half.dtype == torch.bfloat16 and torch.equal(half, state["half"])
    assert loaded == {key: value for key, value in state.items() if key not in ("model", "rng", "half")}
    assert load_checkpoint(tmp_path).keys() == load_checkpoint(path).keys()  # a run directory stands for its file


def test_the_same_state_gives_the_same_bytes(tmp_path):
    state = model_state()
    save_checkpoint(state, tmp_path / "first.pt")
    save_checkpoint(state, tmp_path / "second.pt")
    assert (tmp_path / "first.pt").read_bytes() == (tmp_path / "second.pt").read_bytes()


def test_a_save_that_fails_keeps_the_previous_file_byte_for_byte(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(model_state(), path)
    before = path.read_bytes()
    # A lambda cannot be pickled (AttributeError, or PicklingError on newer Pythons): torch.save fails half way.
    with pytest.raises((AttributeError, pickle.PicklingError)):
        save_checkpoint({**model_state(), "schedule": lambda iteration: 0.1}, path)
    assert path.read_bytes() == before
    assert [entry.name for entry in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_the_file_is_fsynced_before_the_rename_and_the_directory_after(tmp_path, monkeypatch):
    # A power cut must leave the old checkpoint or the whole new one: the bytes are on disk before the rename makes
    # them the checkpoint, and the rename (a directory entry) is on disk before the save returns.
    path = tmp_path / "checkpoint.pt"
    events = []
    fsync, replace = os.fsync, os.replace

    def spy_fsync(fd: int) -> None:
        status = os.fstat(fd)
        kind = "directory" if stat.S_ISDIR(status.st_mode) else "file"
        events.append(("fsync", kind, status.st_ino, status.st_size if kind == "file" else None))
        fsync(fd)

    def spy_replace(source, target) -> None:
        events.append(("replace", os.path.basename(source), os.path.basename(target)))
        replace(source, target)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    save_checkpoint(model_state(), path)
    written = path.stat()
    assert events == [("fsync", "file", written.st_ino, written.st_size),  # every byte, then the rename
                      ("replace", "checkpoint.pt.partial", "checkpoint.pt"),
                      ("fsync", "directory", tmp_path.stat().st_ino, None)]


def test_load_model_builds_the_recorded_model_in_eval_mode(tmp_path):
    state = model_state()
    save_checkpoint(state, tmp_path / "checkpoint.pt")
    model, loaded = load_model(tmp_path)
    assert not model.training and loaded["model_name"] == "resnet20"
    assert (model.conv1.in_channels, model.fc.out_features) == (1, 3)
    assert_same_tensors(model.state_dict(), state["model"])
    assert checkpoint_path(tmp_path) == tmp_path / "checkpoint.pt"


def test_safetensors_export_loads_back_as_the_same_model(tmp_path):
    state = model_state()
    model = create_model("resnet20", **KWARGS)
    model.load_state_dict(state["model"])
    path = tmp_path / "model.safetensors"
    export_safetensors(model, path, metadata={"model": "resnet20"})
    exported = load_file(str(path))
    assert_same_tensors(exported, model.state_dict())
    assert {tensor.dtype for tensor in exported.values()} == {torch.float32, torch.int64}  # BN counters included
    with safe_open(str(path), "pt") as file:
        assert file.metadata() == {"model": "resnet20"}
    rebuilt = create_model("resnet20", **KWARGS)
    rebuilt.load_state_dict(exported)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x), rtol=0, atol=0)
