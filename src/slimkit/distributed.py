"""torch.distributed plumbing: set-up from torchrun's environment, rank queries, reductions.

Training runs unchanged under ``torchrun --nproc_per_node N``: gloo on CPU, NCCL on GPU.
Outside torchrun every helper degrades to the single-process answer.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def init_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1). Returns True if distributed."""
    if dist.is_available() and dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


@contextlib.contextmanager
def process_group_from_env() -> Iterator[bool]:
    """Join torchrun's process group for the block and leave it cleanly after (yields is-distributed).

    Leaving matters: a process that exits with its gloo group still open can abort (SIGABRT) when
    its peer closes the connection first. On success every rank waits at a barrier, then the group
    is destroyed; after an exception the group is destroyed without waiting for peers.
    """
    joined = init_from_env()
    try:
        yield joined
        if joined and dist.is_initialized():
            dist.barrier()
    finally:
        if joined and dist.is_initialized():
            dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (the process that writes files and prints)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def default_device() -> torch.device:
    """This process's device: its GPU under NCCL, else the CPU."""
    if torch.cuda.is_available() and os.environ.get("SLIMKIT_DEVICE", "auto") != "cpu":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum a few numbers over all ranks (float64)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device or default_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
