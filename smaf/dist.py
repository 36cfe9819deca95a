"""Process-group helpers. A run launched by torchrun (RANK/WORLD_SIZE set) uses DDP; otherwise it is a
single process. Only rank 0 writes shared files (configs, checkpoints, reports)."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def select_device(requested: str = "auto") -> torch.device:
    """``auto`` -> this process's CUDA device when available (LOCAL_RANK under torchrun), else CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda was requested but CUDA is not available; use device=auto or device=cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def init_from_env(requested_device: str = "auto") -> torch.device:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU); returns the device."""
    device = select_device(requested_device)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op for one process); returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(items: list, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's share of ``items`` (round robin), so every item is handled by exactly one rank."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return items[r::w]
