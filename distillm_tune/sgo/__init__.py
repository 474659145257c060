"""Adaptive off-policy student-generated outputs (DISTILLM_SPEC §2–§4): replay buffer, adaptive
scheduler, per-method data policy and the batched KV-cache sampler."""

from distillm_tune.sgo.policy import METHODS, SOURCES, choose_source, shared_uniform
from distillm_tune.sgo.replay_buffer import ReplayBuffer
from distillm_tune.sgo.sampler import generate_responses
from distillm_tune.sgo.scheduler import REPLAY_RATIOS, AdaptiveSGOScheduler

__all__ = [
    "METHODS",
    "REPLAY_RATIOS",
    "SOURCES",
    "AdaptiveSGOScheduler",
    "ReplayBuffer",
    "choose_source",
    "generate_responses",
    "shared_uniform",
]
