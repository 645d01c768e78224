"""Process groups for ``torchrun``, a resumable sharded sampler, and small collectives.

The same ``train.py`` runs alone or under ``torchrun --nproc_per_node=N``: torchrun sets
``RANK``/``WORLD_SIZE``/``LOCAL_RANK``, and `init_distributed` then joins the group with
NCCL on CUDA and gloo on CPU. Without those variables everything here is a no-op.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_dist_info() -> DistInfo:
    """Reads torchrun's environment variables (a single process when they are absent).

    A SLURM job launched by submitit with several tasks (``hydra.launcher.tasks_per_node=N``)
    has no torchrun variables; submitit's helper exports them from SLURM's (every task
    keeps all GPUs visible and picks ``cuda:LOCAL_RANK``).
    """
    if ("RANK" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR") == "slurm"
            and int(os.environ.get("SLURM_NTASKS", "1")) > 1):
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``auto`` -> this rank's GPU when CUDA is present, else CPU; other names as given."""
    if name in (None, "", "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available; use device=cpu or device=auto")
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


_CONTROL_GROUP = None  # a gloo group for host-side flags when the main group is NCCL


def init_distributed(device: torch.device, info: DistInfo) -> None:
    """Joins torchrun's process group (NCCL on CUDA, gloo on CPU) when world_size > 1.

    With NCCL a second, gloo group carries host-side control flags (`any_rank`), so that
    agreeing on a stop never synchronises the GPU stream with the host.
    """
    global _CONTROL_GROUP
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    _CONTROL_GROUP = dist.new_group(backend="gloo") if backend == "nccl" else None


def shutdown_distributed() -> None:
    global _CONTROL_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _CONTROL_GROUP = None


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_mean(value: float | torch.Tensor, device: torch.device | None = None) -> float:
    """Mean of a scalar over ranks (the value itself when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    t = torch.as_tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (e.g. a SIGTERM seen by one).

    A CPU all-reduce over gloo: no GPU work, no device synchronisation.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_CONTROL_GROUP)
    return bool(t.item())


class ResumableSampler(Sampler[int]):
    """Shuffled (or ordered) indices of one epoch, sharded over ranks, startable mid-epoch.

    Like ``DistributedSampler`` (same padding so every rank sees the same number of
    samples), but the permutation depends only on ``(seed, epoch)`` and
    ``set_epoch(epoch, start)`` skips the first ``start`` indices of this rank's shard
    without loading them: a resumed run sees exactly the batches it had not seen yet.
    """

    def __init__(self, length: int, *, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False):
        self.length = length
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        if drop_last:
            self.per_rank = length // world_size
        else:
            self.per_rank = math.ceil(length / world_size)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch = epoch
        self.start = start

    def shard(self) -> list[int]:
        """This rank's indices for the current epoch, from the beginning."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        if total > len(order):
            order = (order * math.ceil(total / max(len(order), 1)))[:total]
        order = order[:total]
        return order[self.rank:total:self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start
