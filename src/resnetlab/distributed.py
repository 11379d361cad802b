"""torch.distributed glue for `torchrun ... -m resnetlab train`: kept out of the training loop's way.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them a run is one process and nothing here does anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> Context:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Context()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank=rank, world_size=world_size, local_rank=local_rank)


def local_device(device: torch.device, context: Context) -> torch.device:
    """Each process on a CUDA machine drives its own GPU."""
    if device.type == "cuda" and context.active:
        torch.cuda.set_device(context.local_rank)
        return torch.device("cuda", context.local_rank)
    return device


def wrap(model: nn.Module, context: Context, device: torch.device, sync_bn: bool) -> nn.Module:
    if not context.active:
        return model
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def mean_over_processes(values: torch.Tensor, context: Context) -> torch.Tensor:
    if context.active:
        values = values.clone()
        dist.all_reduce(values)
        values /= context.world_size
    return values


def barrier(context: Context) -> None:
    if context.active:
        dist.barrier()


def teardown(context: Context) -> None:
    if context.active and dist.is_initialized():
        dist.destroy_process_group()
