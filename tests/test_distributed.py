"""`torchrun --nproc-per-node 2 -m resnetlab train`, for real: two gloo processes on 127.0.0.1 against one process
with the same global batch, with sync BN (to float rounding) and without (approximately), a 2-process checkpoint
resumed by one process, and what rank 0 alone writes. The 1-process runs are made in this process.

Run as a script (under torchrun), this file is run_helpers.py's `resnetlab` with one more hook, which records the
rank of every process that writes a checkpoint:

    python -m torch.distributed.run --nproc-per-node 2 tests/test_distributed.py --record-saves LOG -- train ...
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from run_helpers import cli_args, model_weights, read_metrics, tiny_config

import resnetlab.train as training
from resnetlab import distributed
from resnetlab.checkpoint import load_checkpoint
from resnetlab.data import load_dataset
from resnetlab.data.batches import array_batches
from resnetlab.train import resume_config, train

THIS_FILE = Path(__file__).resolve()
ITERATIONS, CHECKPOINT_EVERY = 10, 5
# lr 0.02 instead of the recipe's 0.1: at 0.1 the first iterations of a fresh net are chaotic, and float
# rounding differences (a sum split over two processes) grow to 1e-3 of the loss within ten iterations.
RUN = dict(iterations=ITERATIONS, lr=0.02, batch_size=32)
# Sync BN makes two processes compute what one does, up to float rounding. Measured: the losses differ by at
# most 3e-7 (relative), the final weights and BN buffers by at most 8e-6 (a running variance of about 3).
SYNC_BN_LOSS_RTOL = 1e-5
SYNC_BN_WEIGHTS = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_process():
    """Every process gets one of the 2 cores (the distributed runs set it themselves; the 1-process runs here
    ask for it): oversubscribed cores make torch's thread pools crawl."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield
    torch.set_num_threads(threads)


def start_torchrun(processes: int, args: list[str], *hooks: str) -> subprocess.Popen:
    """`resnetlab ARGS` in `processes` gloo processes on 127.0.0.1, launched by torchrun."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
               "--master-addr", "127.0.0.1", "--master-port", str(port), str(THIS_FILE), *hooks, "--", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(child: subprocess.Popen) -> str:
    """Stop torchrun and its processes: SIGTERM, which it passes on to them (each runs in a session of its own, out
    of reach of a signal to torchrun's process group). Returns what they wrote to stderr."""
    child.terminate()
    return child.communicate(timeout=60)[1]


def torchrun(processes: int, args: list[str], *hooks: str, timeout: float = 120) -> None:
    child = start_torchrun(processes, args, *hooks)
    try:
        _, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # a hang fails the test instead of blocking it
        raise AssertionError(f"torchrun did not finish in {timeout} s:\n{stop(child)}") from None
    assert child.returncode == 0, err


def losses(out: Path) -> list[float]:
    return [record["train_loss"] for record in read_metrics(out)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "out"
    train(tiny_config(out, **RUN), progress=False)
    return out


@pytest.fixture(scope="module")
def two_processes_sync_bn(tmp_path_factory) -> tuple[Path, list[float]]:
    """Two processes with sync BN, killed while rank 0 writes the second checkpoint, after logging all ten
    iterations: their metrics are the 2-process loss trajectory, their directory a run to resume at iteration 5."""
    out = tmp_path_factory.mktemp("two") / "out"
    marker = out.parent / "stalled"
    child = start_torchrun(2, [*cli_args(out, **RUN, checkpoint_every=CHECKPOINT_EVERY), "--sync-bn"],
                           "--stall-checkpoint", "2", str(marker))
    deadline = time.monotonic() + 120
    while not marker.exists():  # run_helpers.wait_for would SIGKILL torchrun alone and leave its processes
        if child.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the second checkpoint was not half written:\n{stop(child)}")
        time.sleep(0.05)
    stop(child)
    assert load_checkpoint(out)["iteration"] == CHECKPOINT_EVERY
    return out, losses(out)


def test_two_processes_with_sync_bn_follow_the_one_process_losses(one_process, two_processes_sync_bn):
    _, two = two_processes_sync_bn
    assert len(two) == ITERATIONS
    assert two == pytest.approx(losses(one_process), rel=SYNC_BN_LOSS_RTOL)


def test_a_2_process_checkpoint_resumed_by_1_process_ends_where_1_process_all_along_does(one_process,
                                                                                      two_processes_sync_bn):
    interrupted, _ = two_processes_sync_bn
    train(resume_config(interrupted), resume=True, progress=False)
    assert losses(interrupted)[CHECKPOINT_EVERY:] == pytest.approx(losses(one_process)[CHECKPOINT_EVERY:],
                                                                  rel=SYNC_BN_LOSS_RTOL)
    first, second = model_weights(one_process), model_weights(interrupted)
    assert first.keys() == second.keys()  # sync BN layers keep BatchNorm2d's state_dict keys
    for name in first:
        torch.testing.assert_close(second[name], first[name], **SYNC_BN_WEIGHTS,
                                   msg=lambda message, name=name: f"{name}: {message}")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[Path, Path]:
    """Two processes without sync BN, run to the end with --tensorboard, recording which processes write
    checkpoints."""
    out = tmp_path_factory.mktemp("plain") / "out"
    saves = out.parent / "saves.log"
    torchrun(2, [*cli_args(out, **RUN), "--tensorboard"], "--record-saves", str(saves))
    return out, saves


def test_rank_0_alone_writes_the_checkpoint_once_the_metrics_and_the_tensorboard_events(two_processes):
    out, saves = two_processes
    assert saves.read_text() == "rank 0\n"  # checkpoint_every 0: the final checkpoint only, by rank 0 only
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "model.safetensors",
                                                           "summary.json", "tb"]
    assert len(list((out / "tb").iterdir())) == 1  # an event file names its process: one file, one writer
    assert [record["iteration"] for record in read_metrics(out)] == list(range(1, ITERATIONS + 1))
    assert load_checkpoint(out)["iteration"] == ITERATIONS
    assert json.loads((out / "summary.json").read_text())["processes"] == 2


def test_the_shares_of_a_global_batch_are_the_one_process_batch_augmented_alike():
    train_set = load_dataset("digits").train
    settings = dict(batch_size=32, seed=3, start=40, stop=50, padding=1, flip=True)  # crosses an epoch's end
    whole = list(array_batches(train_set.images, train_set.labels, **settings))
    shares = [list(array_batches(train_set.images, train_set.labels, **settings, rank=rank, world_size=4))
              for rank in range(4)]
    for iteration, (images, labels) in enumerate(whole):
        for rank in range(4):
            share_images, share_labels = shares[rank][iteration]
            assert torch.equal(share_images, images[rank::4]) and torch.equal(share_labels, labels[rank::4])


def first_loss_with_statistics_per_process(out: Path, processes: int) -> float:
    """The first iteration's loss, computed here in one process: the mean over the processes' shards of the loss
    each gets with BN statistics of its shard alone."""
    run = training.prepare(tiny_config(out, **RUN), resume=False)
    shard_losses = []
    for rank in range(processes):
        shard = replace(run, context=distributed.Context(rank=rank, world_size=processes))
        images, labels = next(iter(training.training_batches(shard)))
        with torch.no_grad():
            shard_losses.append(F.cross_entropy(run.trained(run.normalize(images)), labels).item())
    return sum(shard_losses) / processes


def test_without_sync_bn_each_process_normalizes_its_own_shard(one_process, two_processes, tmp_path):
    one, two = losses(one_process), losses(two_processes[0])
    # Iteration 1 starts from the same weights: its loss is exactly that of BN over each 16-image shard ...
    expected_first = first_loss_with_statistics_per_process(tmp_path / "check", processes=2)
    assert two[0] == pytest.approx(expected_first, rel=SYNC_BN_LOSS_RTOL)
    # ... which is not the 1-process loss (so the sync BN tests above do test something) ...
    assert abs(two[0] / one[0] - 1) > 100 * SYNC_BN_LOSS_RTOL
    # ... and from there the runs drift apart slowly: at lr 0.02 the losses stay within 10% of each other
    # (measured: at most 3%). A wrong shard or augmentation would hide in this margin; the tests above catch it.
    assert two == pytest.approx(one, rel=0.1)


def record_saves(log: Path) -> None:
    """Append the writer's rank to `log` on every torch.save (the trainer saves checkpoints only)."""
    save = torch.save

    def recording_save(obj, file, *args, **kwargs):
        with log.open("a") as record:
            record.write(f"rank {os.environ.get('RANK', 0)}\n")
        return save(obj, file, *args, **kwargs)

    torch.save = recording_save


if __name__ == "__main__":
    from run_helpers import main

    # torchrun drops the "--" that follows the script when no hook comes before it
    argv = sys.argv[1:] if "--" in sys.argv else ["--", *sys.argv[1:]]
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--record-saves", type=Path)
    hooks, others = parser.parse_known_args(argv[:split])
    if hooks.record_saves:
        record_saves(hooks.record_saves)
    sys.exit(main([*others, *argv[split:]]))
