"""Multi-process training: the process group of a ``torchrun`` launch
(gloo on CPU, nccl on CUDA), read from the environment torchrun sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in the job.

    Attributes:
        rank: this process's index in [0, world_size).
        world_size: number of processes (1: not distributed).
        local_rank: index on this machine (the GPU it uses).
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 logs, shows progress and writes checkpoints."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when the environment names a process group (torchrun sets
    WORLD_SIZE and RANK for each process it starts)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _env_int(name: str) -> int:
    value = os.environ.get(name, "0")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: torch.device) -> DistributedContext:
    """Joins the process group when launched by torchrun, else returns a
    single-process context on ``device``.

    Args:
        device: the requested device; under torchrun a CUDA device becomes
            ``cuda:LOCAL_RANK`` (one GPU per process).

    Returns:
        The DistributedContext (backend nccl for CUDA, gloo for CPU).
    """
    if not launched_by_torchrun() or _env_int("WORLD_SIZE") <= 1:
        return DistributedContext(device=device)
    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible): start at most one "
                "process per GPU (torchrun --nproc_per_node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed(context: DistributedContext) -> None:
    """Leaves the process group (after a barrier, so that no rank exits
    while another still talks to it)."""
    if context.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


__all__ = ["DistributedContext", "init_distributed", "launched_by_torchrun", "shutdown_distributed"]
