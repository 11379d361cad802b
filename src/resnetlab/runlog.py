"""The bookkeeping every trainer shares (classification and detection): the metrics log (metrics.jsonl and,
optionally, TensorBoard), the checks that a run's numbers stay finite, the check that its directory is writable, and
stopping on Ctrl-C or SIGTERM with the iteration reached saved.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import torch

from resnetlab.checkpoint import checkpoint_path
from resnetlab.errors import ResnetlabError, RunStopped


class NonFiniteLossError(ResnetlabError):
    """The loss or the weights became NaN or inf; the last checkpoint on disk is the last good state."""


def check_finite_weights(network: torch.nn.Module, iteration: int, out: Path) -> None:
    """A step can overflow the weights before any loss shows it: such a state must never become a checkpoint."""
    broken = [name for name, tensor in network.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise NonFiniteLossError(f"the weights became NaN or inf at iteration {iteration} ({broken[0]} and "
                                 f"{len(broken) - 1} more tensors); stopped. {last_good_state(out)}")


class StopOnSignal:
    """While active, SIGINT (Ctrl-C) and SIGTERM (`kill`, a batch scheduler, the end of a session) do not kill the
    run mid-step: they set `signal_number`, and the loop saves a checkpoint after the iteration in progress and stops
    (`stopped`). A second signal acts as it would without this, so a second Ctrl-C stops at once.

    Only where Python can take signals (the main thread) and in single-process runs: the processes of a distributed
    run would each stop at another iteration and wait forever for each other at the checkpoint. A signal the process
    was started to ignore stays ignored, as Python itself leaves it: `nohup resnetlab train ... &` in a script starts
    the run with SIGINT ignored, so that a Ctrl-C meant for the script does not reach it."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.signal_number: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if self.enabled:
            # None: a handler not installed from Python, which cannot be put back; the default is the nearest.
            self.previous = {number: signal.signal(number, self.request_stop) or signal.SIG_DFL
                             for number in self.SIGNALS if signal.getsignal(number) != signal.SIG_IGN}
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)
        self.previous = {}

    def request_stop(self, number: int, frame) -> None:
        self.signal_number = number
        signal.signal(number, self.previous.get(number, signal.SIG_DFL))
        again = "Ctrl-C again" if number == signal.SIGINT else "the signal again"
        print(f"\n{signal.Signals(number).name}: stopping after this iteration, once its checkpoint is saved "
              f"({again} stops at once)", file=sys.stderr, flush=True)

    def stopped(self, iteration: int, iterations: int, out: Path, resume: str) -> RunStopped:
        """The error that ends the run, once the state after `iteration` is saved in `out`."""
        return RunStopped(f"stopped by {signal.Signals(self.signal_number).name} after iteration {iteration:,} of "
                          f"{iterations:,}; {checkpoint_path(out)} holds it, and `{resume} {out}` continues the run",
                          self.signal_number)


def last_good_state(out: Path) -> str:
    path = checkpoint_path(out)
    return f"{path} holds the last good state" if path.is_file() else "no checkpoint had been written yet"


def ensure_writable(out: Path) -> None:
    """Fail before any training if the run cannot write its results."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"--out {out} is not writable: {error.strerror or error}") from None


class MetricsLog:
    """Each metrics record as a line of OUT/metrics.jsonl and, with `tensorboard`, as TensorBoard scalars under
    OUT/tb (tagged with the record's keys, at step `iteration`)."""

    def __init__(self, out: Path, start: int, *, tensorboard: bool):
        self.path = out / "metrics.jsonl"
        # A resumed run repeats the iterations after its checkpoint, and a fresh run into an old directory starts
        # anew: both logs forget what was logged after `start`.
        self.tensorboard = tensorboard_writer(out / "tb", purge_step=start + 1) if tensorboard else None
        forget_metrics_after(self.path, start)

    def write(self, record: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        if self.tensorboard:
            for key, value in record.items():
                if key != "iteration":
                    self.tensorboard.add_scalar(key, value, record["iteration"])
            self.tensorboard.flush()  # as current on disk as metrics.jsonl, should the run stop

    def close(self) -> None:
        if self.tensorboard:
            self.tensorboard.close()


def tensorboard_writer(directory: Path, purge_step: int):
    """torch's SummaryWriter, imported only here: tensorboard is an optional dependency."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ResnetlabError("--tensorboard needs the tensorboard package: pip install tensorboard (or "
                             "pip install 'resnetlab[tensorboard]')") from None
    return SummaryWriter(str(directory), purge_step=purge_step)


def forget_metrics_after(path: Path, iteration: int) -> None:
    """A resumed run repeats the iterations after its checkpoint: drop the lines the interrupted run logged."""
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True) if logged_at_most(line, iteration)]
        path.write_text("".join(kept))


def logged_at_most(line: str, iteration: int) -> bool:
    try:  # a line cut short by the kill is dropped too
        return line.endswith("\n") and json.loads(line)["iteration"] <= iteration
    except (json.JSONDecodeError, KeyError, TypeError):
        return False
