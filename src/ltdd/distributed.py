"""torch.distributed helpers: process-group setup from torchrun's environment, rank-local devices, sharding.

Works with one process (no torchrun: rank 0 of 1, nothing initialised), with gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist


def world_from_env() -> tuple[int, int]:
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


@contextlib.contextmanager
def dist_context(backend: str | None = None):
    """Initialise the default process group when launched by torchrun; yields (rank, world_size)."""
    rank, world = world_from_env()
    started = False
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend)
        started = True
    if world > 1 and not torch.cuda.is_available():
        # CPU ranks share the machine's cores: give each its share instead of oversubscribing
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    try:
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (rank, world)
    finally:
        if started:
            dist.barrier()
            dist.destroy_process_group()


def local_device(device: torch.device, rank: int) -> torch.device:
    """With several processes on CUDA, each rank takes its own GPU (by LOCAL_RANK when set)."""
    if device.type == "cuda" and torch.cuda.device_count() > 1:
        local = int(os.environ.get("LOCAL_RANK", rank))
        return torch.device("cuda", local % torch.cuda.device_count())
    return device


def shard(items: list, rank: int, world: int) -> list:
    """The items this rank handles: every world-th item starting at rank."""
    return items[rank::world]


_LOCAL_ONLY = [0]


@contextlib.contextmanager
def local_only():
    """Inside this block the library behaves as a single process even under torchrun (used when each rank does
    independent work, e.g. one cell of a results table)."""
    _LOCAL_ONLY[0] += 1
    try:
        yield
    finally:
        _LOCAL_ONLY[0] -= 1


def is_distributed() -> bool:
    return (not _LOCAL_ONLY[0]) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def gather_by_index(local: dict[int, object], total: int) -> list:
    """Each rank computed some items of a list (a dict index -> item); every rank gets the full list back."""
    if not is_distributed():
        return [local[i] for i in range(total)]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    merged: dict = {}
    for p in parts:
        merged.update(p)
    return [merged[i] for i in range(total)]


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op with one process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
