"""torch.distributed glue for `torchrun ... -m resnetlab train`: kept out of the training loop's way.

torchrun sets RANK, LOCAL_RANK, WORLD_SIZE and LOCAL_WORLD_SIZE; without them a run is one process and nothing
here does anything. Processes talk over NCCL on CUDA and gloo on CPU. Every process holds the same weights
(DistributedDataParallel averages the gradients), trains on its share of each global batch, and rank 0 alone
evaluates and writes; the others receive what it measured, so all of them take the same decisions.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

T = TypeVar("T")


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
    if device.type == "cpu":
        # The processes on one machine share its cores: one thread pool each over all of them would
        # oversubscribe them (torchrun's own default, OMP_NUM_THREADS=1, leaves most of them idle).
        torch.set_num_threads(max(1, usable_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Context(rank=rank, world_size=world_size, local_rank=local_rank)


def usable_cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_device(device: torch.device, context: Context) -> torch.device:
    """Each process on a CUDA machine drives its own GPU."""
    if device.type == "cuda" and context.active:
        torch.cuda.set_device(context.local_rank)
        return torch.device("cuda", context.local_rank)
    return device


def wrap(model: nn.Module, context: Context, device: torch.device, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel around `model`; with `sync_bn`, its BatchNorm layers first become ones whose
    training statistics are those of the global batch. The state_dict keys stay those of `model`."""
    if not context.active:
        return model
    if sync_bn:
        # nn.SyncBatchNorm refuses CPU tensors, so gloo runs get GlobalBatchNorm2d, which computes the same.
        model = (nn.SyncBatchNorm.convert_sync_batchnorm(model) if device.type == "cuda"
                 else GlobalBatchNorm2d.convert(model))
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training-mode mean and variance are those of the images of all processes together.

    The per-channel sums are added over the processes by a differentiable all-reduce, so the backward pass
    sends each process its share of the gradient through the statistics too: the gradients are those of the
    global batch in one process. Two passes (the mean, then the squared deviations from it) keep the variance
    as exact as BatchNorm2d's. In eval mode it is BatchNorm2d: running statistics, no communication.
    """

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Change every BatchNorm2d in `module` into this class in place, sharing its parameters and buffers."""
        for layer in module.modules():
            if type(layer) is nn.BatchNorm2d:
                layer.__class__ = cls
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        dims, shape = (0, 2, 3), (1, -1, 1, 1)
        local_count = torch.tensor([x.numel() // x.shape[1]], dtype=torch.float32, device=x.device)
        x = x.float()  # statistics in fp32 even under bf16 autocast, as BatchNorm2d keeps them
        totals = _SumOverProcesses.apply(torch.cat([x.sum(dims), local_count]))
        count = totals[-1]
        mean = totals[:-1] / count
        centered = x - mean.view(shape)
        variance = _SumOverProcesses.apply(centered.square().sum(dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(variance * count / (count - 1), momentum)  # unbiased, as BatchNorm2d
        y = centered * torch.rsqrt(variance + self.eps).view(shape)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


class _SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over the processes, differentiable: the gradient of every process's copy of the sum
    is needed by each addend, so the backward pass sums the incoming gradients over the processes too."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def on_main(context: Context, compute: Callable[[], T]) -> T:
    """`compute()` run by rank 0 alone, its result (any picklable object) handed to every process: the others
    would only repeat the same work, and with their own BN running statistics might even get other numbers."""
    if not context.active:
        return compute()
    holder = [compute() if context.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


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
    """Destroy the process group, and free it now. A DistributedDataParallel left in a reference cycle keeps the
    group, and gloo's threads, alive until the interpreter exits, where a thread still running aborts the process
    ("terminate called without an active exception", seen in about 1 of 10 two-process runs)."""
    if context.active and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
