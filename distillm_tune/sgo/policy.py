"""Which data a training step uses, per method (DISTILLM_SPEC §2 and §4).

The recipe draws one ``u ~ U(0, 1)`` per step with :func:`shared_uniform` and asks
:func:`choose_source` whether to train on the fixed dataset batch, on freshly generated student
outputs ("sgo") or on a batch replayed from the buffer. The choice is a pure function of its
arguments, so all ranks that pass the same ``u`` and state take the same path.
"""

from typing import Optional

import torch
import torch.distributed as dist

from distillm_tune.sgo.scheduler import AdaptiveSGOScheduler

METHODS = ("sft", "kd", "seqkd", "imitkd", "gkd", "distillm", "distillm2")
# methods that train on student-generated outputs (the collapse guard and sgo.start_after_steps apply)
SGO_METHODS = ("imitkd", "gkd", "distillm", "distillm2")
SOURCES = ("dataset", "sgo", "replay")


def choose_source(
    method: str,
    u: float,
    *,
    step: int = 0,
    scheduler: Optional[AdaptiveSGOScheduler] = None,
    buffer_len: int = 0,
    batch_size: int = 1,
    gkd_sgo_prob: float = 0.5,
) -> str:
    """Return "dataset", "sgo" or "replay" for this step.

    - sft, kd, seqkd: always "dataset" (seqkd's dataset already holds teacher outputs).
    - distillm2: always "pairs" (every batch pairs teacher responses with the student's own,
      sampled once per epoch; DISTILLM2_SPEC §1.5).
    - imitkd: always "sgo" (on-policy every step).
    - gkd: "sgo" if ``u < gkd_sgo_prob`` (default 0.5), else "dataset".
    - distillm (Algorithm 1): "sgo" if ``u < scheduler.sgo_prob(step)``; else if
      ``u < scheduler.phi``: "replay", or "sgo" while the buffer holds fewer than ``batch_size``
      samples (replay needs something to replay; the reference also generates then); else "dataset".
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    if not (0.0 <= u < 1.0):
        raise ValueError(f"u must lie in [0, 1), got {u!r}")
    if method in ("sft", "kd", "seqkd"):
        return "dataset"
    if method == "distillm2":
        return "pairs"
    if method == "imitkd":
        return "sgo"
    if method == "gkd":
        if not (0.0 <= gkd_sgo_prob <= 1.0):
            raise ValueError(f"gkd_sgo_prob must lie in [0, 1], got {gkd_sgo_prob!r}")
        return "sgo" if u < gkd_sgo_prob else "dataset"
    # distillm
    if scheduler is None:
        raise ValueError("method 'distillm' needs an AdaptiveSGOScheduler (scheduler=None given)")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if u < scheduler.sgo_prob(step):
        return "sgo"
    if u < scheduler.phi:
        return "replay" if buffer_len >= batch_size else "sgo"
    return "dataset"


def shared_uniform(generator: torch.Generator, device: Optional[torch.device] = None) -> float:
    """Draw ``u ~ U(0, 1)`` that is identical on every rank.

    Why: the draw decides whether a step generates, replays or reads the dataset, and those paths
    run different collectives (generation under FSDP runs forward passes; only some paths run the
    teacher on generated text). Ranks that disagree deadlock. Seeding ``generator`` identically on
    all ranks already makes the draws equal, but only while every rank consumes the generator
    identically; broadcasting rank 0's value makes agreement hold regardless (one scalar collective
    per step). The generator is still advanced on every rank, so a resumed run restores it the same
    way everywhere. ``generator`` should be dedicated to this draw (a CPU generator); ``device`` is
    where the broadcast tensor lives (default: the current CUDA device for an NCCL-only group,
    else CPU).
    """
    u = torch.rand((), generator=generator, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        if device is None:
            use_cuda = dist.get_backend() == "nccl" and torch.cuda.is_available()
            device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
        t = u.to(device)
        dist.broadcast(t, src=0)
        u = t.cpu()
    return float(u)
