"""Adaptive off-policy student-generated outputs (DISTILLM_SPEC §2–§4): replay buffer, adaptive
scheduler, per-method data policy, the batched KV-cache sampler and the degenerate-output guard."""

from distillm_tune.sgo.guard import degenerate_reason
from distillm_tune.sgo.policy import METHODS, SGO_METHODS, SOURCES, choose_source, shared_uniform
from distillm_tune.sgo.replay_buffer import ReplayBuffer
from distillm_tune.sgo.sampler import generate_responses
from distillm_tune.sgo.scheduler import REPLAY_RATIOS, AdaptiveSGOScheduler

__all__ = [
    "METHODS",
    "REPLAY_RATIOS",
    "SGO_METHODS",
    "SOURCES",
    "AdaptiveSGOScheduler",
    "ReplayBuffer",
    "choose_source",
    "degenerate_reason",
    "generate_responses",
    "shared_uniform",
]
