"""Faults a long run meets, done for real in child processes: SIGKILL mid-run and mid-checkpoint, then --resume;
a broken or foreign checkpoint on resume; a full disk; a data-loader worker that dies. And, in this process,
memory that runs out."""

from __future__ import annotations

import errno
import json
import random
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from run_helpers import (
    assert_same_tensors,
    cli_args,
    last_logged_iteration,
    launch,
    logged_iterations,
    model_weights,
    run_to_end,
    sigkill,
    tiny_config,
    wait_for,
    write_png_folder,
)

import resnetlab.train as training
from resnetlab import inference
from resnetlab.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from resnetlab.cli import main as cli_main
from resnetlab.factory import create_model
from resnetlab.runlog import StopOnSignal
from resnetlab.train import train

ITERATIONS, CHECKPOINT_EVERY = 40, 10


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run every interrupted one must end up equal to, in a child process like them (the number of CPU
    threads changes the float results, so all runs compared here are made the same way)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    finished = run_to_end(cli_args(out, checkpoint_every=CHECKPOINT_EVERY))
    assert finished.returncode == 0, finished.stderr
    return out


def resume_to_end(out: Path) -> None:
    finished = run_to_end(["train", "--resume", str(out), "--quiet"])
    assert finished.returncode == 0, finished.stderr


def test_sigkill_at_a_random_iteration_then_resume_gives_the_uninterrupted_weights(uninterrupted, tmp_path):
    # Any iteration after the first checkpoint and before the last iteration, drawn afresh each time. The kill lands
    # there, mid-run, on a machine of any speed: the child stalls as it is about to run that iteration and is killed
    # only once it has said so (the marker), so it can neither be caught earlier nor run on to the end.
    kill_after = random.randint(CHECKPOINT_EVERY + 1, ITERATIONS - 1)
    out, marker = tmp_path / "out", tmp_path / "stalled"
    child = launch(cli_args(out, checkpoint_every=CHECKPOINT_EVERY), "--stall-at-iteration", str(kill_after),
                   str(marker))
    wait_for(marker.exists, child, what=f"the run to stall after iteration {kill_after}")
    sigkill(child)
    assert last_logged_iteration(out) == kill_after and not (out / "summary.json").exists()
    assert load_checkpoint(out)["iteration"] == kill_after // CHECKPOINT_EVERY * CHECKPOINT_EVERY

    resume_to_end(out)
    assert_same_tensors(model_weights(out), model_weights(uninterrupted))
    assert logged_iterations(out) == list(range(1, ITERATIONS + 1)), f"killed after iteration {kill_after}"


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_saves_the_iteration_in_progress_then_resume_gives_the_uninterrupted_weights(
        uninterrupted, tmp_path, name):
    # The signal lands while an iteration that no periodic checkpoint follows runs, drawn afresh each time: the run
    # finishes that iteration, saves it and stops, so nothing since the last periodic checkpoint is lost.
    at = random.choice([i for i in range(ITERATIONS - 1) if (i + 1) % CHECKPOINT_EVERY])
    out = tmp_path / "out"
    stopped = run_to_end(cli_args(out, checkpoint_every=CHECKPOINT_EVERY), "--signal-at-iteration", str(at), name)
    assert stopped.returncode == 128 + getattr(signal, name), stopped.stderr
    assert load_checkpoint(out)["iteration"] == last_logged_iteration(out) == at + 1
    assert not (out / "summary.json").exists()
    last_line = stopped.stderr.strip().splitlines()[-1]
    assert last_line == (f"resnetlab train: stopped by {name} after iteration {at + 1} of {ITERATIONS}; "
                         f"{out / 'checkpoint.pt'} holds it, and `resnetlab train --resume {out}` continues the run")
    assert "Traceback" not in stopped.stderr

    resume_to_end(out)
    assert_same_tensors(model_weights(out), model_weights(uninterrupted))
    assert logged_iterations(out) == list(range(1, ITERATIONS + 1)), f"stopped after iteration {at + 1}"


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_last_periodic_checkpoint(tmp_path):
    out = tmp_path / "out"
    stopped = run_to_end(cli_args(out, checkpoint_every=CHECKPOINT_EVERY), "--signal-at-iteration", "15", "SIGINT",
                         "--signal-times", "2")
    assert stopped.returncode == 128 + signal.SIGINT
    assert stopped.stderr.strip().splitlines()[-1] == "resnetlab train: interrupted"
    assert "Ctrl-C again stops at once" in stopped.stderr and "Traceback" not in stopped.stderr
    assert load_checkpoint(out)["iteration"] == 10 and last_logged_iteration(out) == 15


def test_the_signal_handlers_are_the_callers_again_once_a_run_stops(ctrl_c_as_from_a_terminal):
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        signal.raise_signal(signal.SIGINT)  # without the handler, this test would end pytest itself
        assert stop.signal_number == signal.SIGINT
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_run_started_ignoring_ctrl_c_leaves_it_ignored_and_still_stops_on_sigterm():
    # `nohup resnetlab train ... &` in a script: a Ctrl-C meant for the script must not stop the run.
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with StopOnSignal() as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.signal_number is None
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) == stop.request_stop
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_sigkill_while_a_checkpoint_is_written_keeps_the_previous_one(uninterrupted, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "stalled"
    child = launch(cli_args(out, checkpoint_every=CHECKPOINT_EVERY), "--stall-checkpoint", "2", str(marker))
    wait_for(marker.exists, child, what="the second checkpoint to be half written")
    sigkill(child)
    partial = out / "checkpoint.pt.partial"
    assert partial.stat().st_size > 0  # the half-written file is there ...
    with pytest.raises(CheckpointError, match=f"checkpoint {re.escape(str(partial))} is truncated or corrupt"):
        load_checkpoint(partial)  # ... it is not a checkpoint ...
    assert load_checkpoint(out)["iteration"] == CHECKPOINT_EVERY  # ... and the previous one is intact

    resume_to_end(out)
    assert_same_tensors(model_weights(out), model_weights(uninterrupted))
    assert not partial.exists()


def flip_bytes_in_the_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(255 - b for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


def swap_in_other_weights(path: Path) -> None:
    """A checkpoint whose bookkeeping says resnet20 but whose weights are another network's."""
    state = load_checkpoint(path)
    state["model"] = create_model("resnet32", num_classes=10, in_channels=1).state_dict()
    save_checkpoint(state, path)


BREAKAGES = {
    "truncated": (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
                  "is truncated or corrupt"),
    "corrupted": (flip_bytes_in_the_middle, "is truncated or corrupt"),
    "empty": (lambda path: path.write_bytes(b""), "is truncated or corrupt"),
    "foreign": (lambda path: torch.save({"weights": torch.zeros(3)}, path), "is not a resnetlab checkpoint"),
    "other model": (swap_in_other_weights, r"\(resnet20, .*\) does not fit this model"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_broken_checkpoint_on_resume_is_a_clear_error_and_trains_nothing(uninterrupted, tmp_path, capsys, breakage):
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    (out / "summary.json").unlink()
    break_file, message = BREAKAGES[breakage]
    break_file(out / "checkpoint.pt")
    before = {path.name: path.read_bytes() for path in out.iterdir()}

    assert cli_main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert re.match(f"resnetlab train: error: (checkpoint )?{re.escape(str(out / 'checkpoint.pt'))} .*{message}", err)
    assert "Traceback" not in err and err.count("\n") == 1
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # not a byte written


def test_resume_without_a_checkpoint_says_so(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    assert cli_main(["train", "--resume", str(tmp_path / "out"), "--quiet"]) == 2
    expected = f"resnetlab train: error: checkpoint {tmp_path / 'out' / 'checkpoint.pt'} does not exist\n"
    assert capsys.readouterr().err == expected
    assert list((tmp_path / "out").iterdir()) == []


def test_resume_refuses_flags_that_change_the_run_and_takes_the_ones_that_change_the_hardware(uninterrupted, tmp_path,
                                                                                             capsys):
    """A run started on a GPU with CUDA graphs continues on the CPU without them; another lr would be neither run."""
    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    (out / "summary.json").unlink()
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    assert cli_main(["train", "--resume", str(out), "--lr", "0.5", "--recipe", "imagenet", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"resnetlab train: error: {out} resumes as it was started; these flags differ from it: "
                          "--lr 0.5 (the run has 0.1), --recipe 'imagenet' (the run has 'cifar')")
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before

    state = load_checkpoint(out)
    state["config"]["cuda_graphs"] = True  # as a GPU run stores it
    save_checkpoint({key: value for key, value in state.items() if key != "format"}, out / "checkpoint.pt")
    assert cli_main(["train", "--resume", str(out), "--no-cuda-graphs", "--device", "cpu", "--lr", "0.1",
                     "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["cuda_graphs"] is False and summary["config"]["device"] == "cpu"


def test_disk_full_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    save, saves = torch.save, []

    def save_until_the_disk_fills(state, file, *args, **kwargs):
        saves.append(state["iteration"])
        if len(saves) == 1:
            return save(state, file, *args, **kwargs)
        file.write(b"PK\x03\x04 some bytes made it")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    config = tiny_config(tmp_path / "out", iterations=ITERATIONS, checkpoint_every=CHECKPOINT_EVERY)
    with pytest.raises(OSError, match="No space left on device") as error:
        train(config, progress=False)
    assert error.value.errno == errno.ENOSPC and saves == [10, 20]
    monkeypatch.undo()
    assert load_checkpoint(config.out)["iteration"] == 10
    assert sorted(path.name for path in Path(config.out).iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


def test_a_dying_data_loader_worker_stops_the_run_with_a_message(tmp_path):
    write_png_folder(tmp_path / "images")
    args = cli_args(tmp_path / "out", data=f"folder:{tmp_path / 'images'}", iterations=2, batch_size=4, workers=1)
    finished = run_to_end(args, "--kill-loader-worker", timeout=120)  # a hang fails here instead of blocking
    assert finished.returncode == 2, finished.stderr
    # torch reports it one way or the other, depending on which of its checks sees the death first
    assert re.fullmatch(r"resnetlab train: error: DataLoader worker \(pid.*\) (exited unexpectedly|is killed by "
                        r"signal: Killed\.)\n", finished.stderr), finished.stderr
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize("name", ["SIGINT", "SIGTERM"])
def test_a_signal_to_the_whole_group_while_the_loop_waits_for_loader_workers_still_saves_and_stops(tmp_path, name):
    # A terminal's Ctrl-C reaches the workers too, and so does the SIGTERM of a batch scheduler stopping a job or of
    # `pkill -f`: they go on decoding the batch the loop is waiting for, and leave the answer to the loop (a forked
    # worker has the loop's handler, and would say it stops as well; torch's own SIGTERM handler would kill it).
    write_png_folder(tmp_path / "images")
    out = tmp_path / "out"
    args = cli_args(out, data=f"folder:{tmp_path / 'images'}", iterations=3, batch_size=4, workers=1)
    stopped = run_to_end(args, "--signal-group-from-loader-worker", name, str(tmp_path / "sent"), timeout=120)
    assert stopped.returncode == 128 + getattr(signal, name), stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1].startswith(f"resnetlab train: stopped by {name} after iteration 1 "
                                                             "of 3; "), stopped.stderr
    assert load_checkpoint(out)["iteration"] == 1
    assert stopped.stderr.count(f"{name}: stopping after this iteration") == 1, stopped.stderr


def test_running_out_of_memory_is_one_line_naming_the_flags_that_need_less(tmp_path, monkeypatch, capsys):
    def allocate_a_pebibyte(*args, **kwargs):  # more than any address space: torch's CPU allocator refuses it
        return torch.empty(2**50, dtype=torch.uint8)

    monkeypatch.setattr(training, "train", allocate_a_pebibyte)
    assert cli_main(["train", "--model", "resnet20", "--data", "digits", "--out", str(tmp_path), "--quiet"]) == 2
    assert capsys.readouterr().err == (
        "resnetlab train: error: out of memory on the CPU (tried to allocate 1125899906842624 bytes); try a smaller "
        "--batch-size, --activation-checkpointing or --precision bf16 on a GPU\n")


def test_a_gpu_out_of_memory_error_names_the_flags_the_command_has(tmp_path, monkeypatch, capsys):
    def out_of_gpu_memory(*args, **kwargs):  # torch's CUDA message, as a 1.5 GiB request on a full GPU gives it
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 has a total capacity of "
                                     "79.19 GiB of which 1.06 GiB is free. Of the allocated memory 76.8 GiB is "
                                     "allocated by PyTorch, and 312.4 MiB is reserved by PyTorch but unallocated.")

    monkeypatch.setattr(inference, "predict", out_of_gpu_memory)
    assert cli_main(["predict", str(tmp_path), "image.png"]) == 2
    assert capsys.readouterr().err == ("resnetlab predict: error: out of memory on the GPU (tried to allocate "
                                       "1.50 GiB); try --precision bf16 on a GPU\n")


def test_an_unexpected_runtime_error_keeps_its_traceback(tmp_path, monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x64 and 32x10)")

    monkeypatch.setattr(training, "train", bug)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        cli_main(["train", "--model", "resnet20", "--data", "digits", "--out", str(tmp_path), "--quiet"])
