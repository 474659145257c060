"""Process-group set-up chosen by device, and the few collectives the recipes use.

torchtune 0.6.1's recipes call ``init_process_group("cuda:nccl,cpu:gloo")``, which fails on a
CPU-only build (no NCCL); here the backend follows the device: gloo on CPU, NCCL on CUDA.
"""

import os
import signal
import sys
from typing import Any, Callable, Tuple

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


def run_on_rank_zero(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only (file-system checks and writes); its result, or the ``ValueError``
    it raised, reaches every rank, so all ranks stop together instead of waiting in a collective."""
    result, message = None, None
    if is_rank_zero():
        try:
            result = fn()
        except ValueError as e:
            message = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [(result, message)]
        dist.broadcast_object_list(box, src=0)
        result, message = box[0]
    if message is not None:
        raise ValueError(message)
    return result


def exit_with_launcher() -> None:
    """Have the kernel send SIGTERM to this worker when its parent (torchrun's agent, i.e. the
    ``tune run`` process) dies: a SIGKILLed launcher would otherwise leave its workers training
    on, writing into the output directory. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    PR_SET_PDEATHSIG = 1  # noqa: N806 - the name in <linux/prctl.h>
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return
    if os.getppid() == 1:  # the launcher died before the call above: nobody will signal us
        os.kill(os.getpid(), signal.SIGTERM)


def shard_layers(model: torch.nn.Module, layer_classes: Tuple[type, ...], mp_policy=None) -> None:
    """FSDP2 ``fully_shard`` on every layer of ``layer_classes`` (bottom-up), then on the whole
    model, as torchtune 0.6.1's ``training.shard_model`` does; unlike it, with an optional
    ``MixedPrecisionPolicy`` (``shard_model`` takes none)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {"reshard_after_forward": True}
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    layers = [m for m in reversed(list(model.modules())) if isinstance(m, layer_classes)]
    if not layers:
        raise ValueError(f"no layer of {[c.__name__ for c in layer_classes]} to shard in {type(model).__name__}")
    for m in layers:
        fully_shard(m, **kwargs)
    fully_shard(model, **kwargs)
