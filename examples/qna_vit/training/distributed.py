"""Process groups for ``torchrun`` (single or multi-node) and the few collectives training needs.

``torchrun --nproc_per_node=N train.py ...`` (or ``--nnodes=M --rdzv-backend=c10d --rdzv-endpoint=host:port``
on every node) exports ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`init_distributed` joins the group through ``env://``. Without those variables it is a single
process and every helper here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    world_size: int
    rank: int
    local_rank: int
    device: torch.device
    backend: Optional[str]

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto", backend: Optional[str] = None) -> DistInfo:
    """Joins the ``torchrun`` process group when ``WORLD_SIZE > 1`` (NCCL on GPUs, gloo on CPU unless
    ``backend`` says otherwise) and picks this process's device (``cuda:LOCAL_RANK`` or the CPU)."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {device!r}")
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1:
        backend = backend or ("nccl" if use_cuda else "gloo")
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, init_method="env://")
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError("the process group disagrees with RANK/WORLD_SIZE in the environment")
        return DistInfo(world_size, rank, local_rank, dev, backend)
    return DistInfo(1, 0, 0, dev, None)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum over processes, in place (a no-op for one process)."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean over processes, in place."""
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= info.world_size
    return t


def same_on_all_ranks(value: int, info: DistInfo) -> bool:
    """Whether every process holds the same ``value`` (True for one process)."""
    if not info.enabled:
        return True
    t = torch.tensor([value, -value], dtype=torch.int64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t[0]) == -int(t[1])


def barrier(info: DistInfo) -> None:
    """Waits for every process (a no-op for one)."""
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Leaves the process group (safe to call twice)."""
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
