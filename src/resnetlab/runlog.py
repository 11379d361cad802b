"""The bookkeeping every trainer shares (classification and detection): the metrics log (metrics.jsonl and,
optionally, TensorBoard), the checks that a run's numbers stay finite, and the check that its directory is writable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from resnetlab.checkpoint import checkpoint_path
from resnetlab.errors import ResnetlabError


class NonFiniteLossError(ResnetlabError):
    """The loss or the weights became NaN or inf; the last checkpoint on disk is the last good state."""


def check_finite_weights(network: torch.nn.Module, iteration: int, out: Path) -> None:
    """A step can overflow the weights before any loss shows it: such a state must never become a checkpoint."""
    broken = [name for name, tensor in network.state_dict().items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:
        raise NonFiniteLossError(f"the weights became NaN or inf at iteration {iteration} ({broken[0]} and "
                                 f"{len(broken) - 1} more tensors); stopped. {last_good_state(out)}")


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
