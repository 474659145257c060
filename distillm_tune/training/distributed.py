"""Process-group set-up chosen by device, and the few collectives the recipes use.

torchtune 0.6.1's recipes call ``init_process_group("cuda:nccl,cpu:gloo")``, which fails on a
CPU-only build (no NCCL); here the backend follows the device: gloo on CPU, NCCL on CUDA.
"""

import os
from typing import Tuple

import torch
import torch.distributed as dist


def init_process_group_for(device: torch.device) -> Tuple[int, int]:
    """Initialise the default group when launched by torchrun (WORLD_SIZE > 1); (world, rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def is_rank_zero() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (in place) when distributed; returns the tensor for chaining."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
