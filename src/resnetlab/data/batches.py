"""Training batches as a pure function of (seed, iteration), so that a resumed run sees the batches it would have seen.

The training set is read as an endless stream of per-epoch permutations; iteration i takes positions
[i*B, (i+1)*B) of it. In a distributed run every process takes its own share of that same global batch (rank r
takes every world_size-th image starting at r), so the global batch stays the recipe's and a run resumes with any
number of processes.
"""

from __future__ import annotations

import copy
import signal
from collections.abc import Callable, Iterator

import torch

from resnetlab.data.augment import random_crop_flip

# Seeds of the permutation and augmentation streams are derived from the run seed with these offsets, so they
# never coincide with each other or with the seed of the weight initialisation.
_PERMUTATION_STREAM = 1_000_003
_AUGMENT_STREAM = 2_000_003
_RANK_STREAM = 1_000_000_007  # offsets the folder augmentation seed of each process


class IndexStream:
    """The image indices of each global batch."""

    def __init__(self, size: int, batch_size: int, seed: int):
        if size < 1:
            raise ValueError("the training set is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self._cached: dict[int, torch.Tensor] = {}

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cached:
            if len(self._cached) > 2:
                self._cached.pop(min(self._cached))
            generator = torch.Generator().manual_seed(self.seed * _PERMUTATION_STREAM + epoch)
            self._cached[epoch] = torch.randperm(self.size, generator=generator)
        return self._cached[epoch]

    def batch(self, iteration: int) -> torch.Tensor:
        first = iteration * self.batch_size
        positions = torch.arange(first, first + self.batch_size)
        epochs, offsets = positions // self.size, positions % self.size
        return torch.cat([self.permutation(int(e))[offsets[epochs == e]] for e in epochs.unique()])


def padding_for(image_size: int, padding_at_32: int) -> int:
    """The paper pads 32x32 CIFAR images by 4; smaller images get the same fraction (8x8 digits: 1 pixel)."""
    return max(1, round(padding_at_32 * image_size / 32)) if padding_at_32 else 0


def array_batches(images: torch.Tensor, labels: torch.Tensor, *, batch_size: int, seed: int, start: int, stop: int,
                  padding: int, flip: bool, rank: int = 0, world_size: int = 1
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 batches of an in-memory dataset (`images` (N, C, H, W), `labels` (N,)), padded, cropped and flipped
    as whole-batch tensor ops.

    The crops and flips are drawn for the whole global batch and each process keeps its share, so an image is
    augmented alike whatever the number of processes (augmenting small images costs next to nothing)."""
    stream = IndexStream(len(labels), batch_size, seed)
    for iteration in range(start, stop):
        index = stream.batch(iteration)
        generator = torch.Generator().manual_seed(seed * _AUGMENT_STREAM + iteration)
        augmented = random_crop_flip(images[index], padding=padding, flip=flip, generator=generator)
        yield augmented[rank::world_size], labels[index[rank::world_size]]


class _IterationSampler(torch.utils.data.Sampler):
    def __init__(self, stream: IndexStream, start: int, stop: int, rank: int, world_size: int):
        self.stream, self.start, self.stop, self.rank, self.world_size = stream, start, stop, rank, world_size

    def __iter__(self):
        for iteration in range(self.start, self.stop):
            yield self.stream.batch(iteration)[self.rank::self.world_size].tolist()

    def __len__(self) -> int:
        return self.stop - self.start


def folder_batches(data: torch.utils.data.Dataset, *, batch_size: int, seed: int, start: int, stop: int, flip: bool,
                   workers: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 batches of an image folder (a dataset with a `transform` and `sizes`, as FolderDataset) at its crop
    size (224 at resolution 1): the scale augmentation of `data.sizes`, decoded with Pillow in DataLoader workers.
    The batch indices follow (seed, iteration) exactly; the random scales and crops are seeded per worker and
    per process (the same seed in every process would give their workers the same draws)."""
    augmented = copy.copy(data)
    augmented.transform = data.sizes.training_view(flip=flip, seed=seed + rank * _RANK_STREAM)
    sampler = _IterationSampler(IndexStream(len(data), batch_size, seed), start, stop, rank, world_size)
    loader = torch.utils.data.DataLoader(
        augmented, batch_sampler=sampler, num_workers=workers, persistent_workers=False,
        worker_init_fn=leave_stop_signals_to_the_loop,
        generator=torch.Generator().manual_seed(seed * _AUGMENT_STREAM + start), timeout=300 if workers else 0)
    yield from loader


def array_evaluation_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, limit: int | None = None
                             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 batches in order, without augmentation."""
    count = len(labels) if limit is None else min(limit, len(labels))
    for first in range(0, count, batch_size):
        yield images[first:first + batch_size], labels[first:first + batch_size]


def folder_evaluation_batches(data: torch.utils.data.Dataset, batch_size: int, workers: int = 0, *,
                              transform: Callable | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 batches in order, each image through `transform` (None keeps each image whole, which needs batch_size 1
    as sizes differ)."""
    viewed = copy.copy(data)
    viewed.transform = transform
    yield from torch.utils.data.DataLoader(viewed, batch_size=batch_size, num_workers=workers,
                                           worker_init_fn=leave_stop_signals_to_the_loop, timeout=300 if workers else 0)


def leave_stop_signals_to_the_loop(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal's group, and a batch scheduler stopping a job (or `pkill -f`)
    sends SIGTERM to all of its processes; the training loop alone answers them (it saves and stops,
    runlog.StopOnSignal). A forked worker would run the loop's handler too and say so again, a spawned one would die
    of SIGINT, and torch's own SIGTERM handler kills a worker, failing the batch the loop waits for. The workers end
    with their loader, or when its process is gone (torch's watchdog), SIGTERM or not."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
