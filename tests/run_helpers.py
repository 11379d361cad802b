"""What the trainer tests share: a tiny run on `digits`, its command line, child processes that can be killed or
broken on purpose, and reading back what a run wrote.

Run as a script, this file is the `resnetlab` command with test hooks installed first:

    python tests/run_helpers.py [--stall-at-iteration I MARKER] [--stall-checkpoint N MARKER] [--kill-loader-worker] \
        [--signal-at-iteration I SIGNAL [--signal-times N]] [--signal-group-from-loader-worker SIGNAL MARKER] \
        -- train ...

The hooks change timing or break things the way real faults do; none of them changes what is computed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from resnetlab.checkpoint import load_checkpoint
from resnetlab.recipes import TrainConfig, resolve_config

THIS_FILE = Path(__file__).resolve()

# resnet20 on the 8x8 digits: about 0.5 s of training for 40 iterations on 2 CPU cores.
TINY_RUN = {"model": "resnet20", "data": "digits", "iterations": 40, "batch_size": 32, "log_every": 1}


def tiny_config(out: Path, **overrides) -> TrainConfig:
    return resolve_config(**{**TINY_RUN, "out": str(out), **overrides})


def cli_args(out: Path, **overrides) -> list[str]:
    """`resnetlab train` arguments of the same run as tiny_config(out, **overrides)."""
    settings = {**TINY_RUN, "out": str(out), **overrides}
    flags = [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value))]
    return ["train", *flags, "--quiet"]


def launch(args: list[str], *hooks: str) -> subprocess.Popen:
    """Start `resnetlab ARGS` in a child process, with the given hook flags; its output is captured."""
    return subprocess.Popen([sys.executable, str(THIS_FILE), *hooks, "--", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run_to_end(args: list[str], *hooks: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `resnetlab ARGS` to its end in a child process, in a process group of its own: a signal a hook sends to
    its group, as a terminal's Ctrl-C reaches every process of one, reaches nothing else."""
    return subprocess.run([sys.executable, str(THIS_FILE), *hooks, "--", *args], capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


def wait_for(condition, process: subprocess.Popen, timeout: float = 60, what: str = "the condition") -> None:
    """Poll until condition() holds; fail if the process ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the child ended (exit {process.returncode}) before {what}:\n"
                                 f"{process.stderr.read()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def sigkill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert process.returncode == -signal.SIGKILL


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def logged_iterations(out: Path) -> list[int]:
    return [record["iteration"] for record in read_metrics(out)]


def last_logged_iteration(out: Path) -> int:
    """The iteration of the last complete metrics line of a run that may be writing one right now (0: none)."""
    path = Path(out) / "metrics.jsonl"
    complete = path.read_text().splitlines(keepends=True) if path.exists() else []
    complete = [line for line in complete if line.endswith("\n")]
    return json.loads(complete[-1])["iteration"] if complete else 0


class Interrupt(Exception):
    """Stops a run in this process as a crash would, between two iterations."""


def train_until(config: TrainConfig, iteration: int) -> None:
    """Train `config` in this process and stop it (Interrupt) as it is about to run `iteration` (0-based)."""
    from resnetlab import train as training
    from resnetlab.schedule import LrSchedule

    lr = LrSchedule.lr

    def lr_or_stop(schedule, at: int) -> float:
        if at == iteration:
            raise Interrupt
        return lr(schedule, at)

    LrSchedule.lr = lr_or_stop
    try:
        training.train(config, progress=False)
    except Interrupt:
        return
    finally:
        LrSchedule.lr = lr
    raise AssertionError(f"the run ended before iteration {iteration}")


def write_png_folder(root: Path, classes: int = 2, per_class: int = 5) -> None:
    """root/<class>/ with small noisy PNGs of one colour per class, plus an empty and a non-image file."""
    rng = np.random.default_rng(0)
    for label in range(classes):
        (root / f"class{label}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, size=(24, 32, 3), dtype=np.uint8)
            pixels[..., label % 3] += 180
            Image.fromarray(pixels).save(root / f"class{label}" / f"{i}.png")
    (root / "class0" / "empty.png").write_bytes(b"")
    (root / "class1" / "notes.png").write_text("not an image")


def model_weights(out: Path) -> dict[str, torch.Tensor]:
    """The model state (parameters and BN buffers) in a run directory's checkpoint."""
    return load_checkpoint(out)["model"]


def differing_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> list[str]:
    """The names of the tensors whose values differ; both must hold the same names."""
    assert first.keys() == second.keys()
    return [name for name in first if not torch.equal(first[name], second[name])]


def assert_same_tensors(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    differing = differing_tensors(first, second)
    assert not differing, f"{len(differing)} of {len(first)} tensors differ, e.g. {differing[:3]}"


# --------------------------------------------------------------------------------------------------------------
# Hooks, installed in the child before the command runs
# --------------------------------------------------------------------------------------------------------------


def stall_at_iteration(iteration: int, marker: Path) -> None:
    """As the run is about to start `iteration` (0-based: that many are done, logged and checkpointed as the run
    does), touch `marker` and hang (the loop asks the schedule for its lr once per iteration, first thing): a run
    held mid-way for the test to kill, however slow or fast the machine."""
    from resnetlab.schedule import LrSchedule

    lr = LrSchedule.lr

    def stalling_lr(self, at: int) -> float:
        if at == iteration:
            marker.touch()
            time.sleep(3600)
        return lr(self, at)

    LrSchedule.lr = stalling_lr


def stall_checkpoint_write(nth: int, marker: Path) -> None:
    """The nth torch.save writes the first half of its bytes, hands them to the kernel, touches `marker` and
    hangs: a process caught in the middle of writing a checkpoint, for the test to kill. No fsync here: a SIGKILL
    loses nothing the kernel holds, and durability is save_checkpoint's job (test_checkpoint.py checks it)."""
    save = torch.save
    calls = 0

    def stalling_save(obj, file, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls < nth:
            return save(obj, file, *args, **kwargs)
        buffer = io.BytesIO()
        save(obj, buffer, *args, **kwargs)
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        file.flush()
        marker.touch()
        time.sleep(3600)

    torch.save = stalling_save


def kill_loader_workers() -> None:
    """A DataLoader worker that dies (as when the kernel's OOM killer picks it) when it decodes its first image."""
    from resnetlab.data.augment import ScaleAugment

    def die_in_worker(self, image):
        if torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("the training images were decoded outside a DataLoader worker")

    ScaleAugment.__call__ = die_in_worker


def signal_group_from_a_loader_worker(name: str, marker: Path) -> None:
    """The first training image a DataLoader worker decodes sends the signal `name` to the whole process group, as a
    terminal's Ctrl-C (SIGINT) or a batch scheduler stopping a job (SIGTERM) does, while the training loop waits for
    that image's batch; `marker` makes it once."""
    from resnetlab.data.augment import ScaleAugment

    augment = ScaleAugment.__call__

    def signal_then_augment(self, image):
        if torch.utils.data.get_worker_info() is not None:
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                pass
            else:
                os.killpg(os.getpgrp(), getattr(signal, name))
        return augment(self, image)

    ScaleAugment.__call__ = signal_then_augment


def signal_at_iteration(iteration: int, name: str, times: int) -> None:
    """As the run starts `iteration` (0-based), the process gets the signal `name` (SIGINT is Ctrl-C) `times`
    times, as from a terminal or `kill`: a signal that lands mid-iteration, on a machine of any speed."""
    from resnetlab.schedule import LrSchedule

    lr = LrSchedule.lr

    def signalling_lr(self, at: int) -> float:
        if at == iteration:
            for _ in range(times):
                signal.raise_signal(getattr(signal, name))
        return lr(self, at)

    LrSchedule.lr = signalling_lr


def main(argv: list[str]) -> int:
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--stall-at-iteration", nargs=2, metavar=("I", "MARKER"))
    parser.add_argument("--stall-checkpoint", nargs=2, metavar=("N", "MARKER"))
    parser.add_argument("--kill-loader-worker", action="store_true")
    parser.add_argument("--signal-at-iteration", nargs=2, metavar=("I", "SIGNAL"))
    parser.add_argument("--signal-times", type=int, default=1)
    parser.add_argument("--signal-group-from-loader-worker", nargs=2, metavar=("SIGNAL", "MARKER"))
    hooks = parser.parse_args(argv[:split])
    # The run starts as from a terminal, whatever started pytest: a script's `pytest &` starts it with SIGINT ignored,
    # which the run would keep ignoring (runlog.StopOnSignal).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if hooks.stall_at_iteration:
        stall_at_iteration(int(hooks.stall_at_iteration[0]), Path(hooks.stall_at_iteration[1]))
    if hooks.stall_checkpoint:
        stall_checkpoint_write(int(hooks.stall_checkpoint[0]), Path(hooks.stall_checkpoint[1]))
    if hooks.kill_loader_worker:
        kill_loader_workers()
    if hooks.signal_at_iteration:
        signal_at_iteration(int(hooks.signal_at_iteration[0]), hooks.signal_at_iteration[1], hooks.signal_times)
    if hooks.signal_group_from_loader_worker:
        name, marker = hooks.signal_group_from_loader_worker
        signal_group_from_a_loader_worker(name, Path(marker))
    from resnetlab.cli import main as resnetlab

    return resnetlab(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
