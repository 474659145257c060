"""Distillation divergences: FKL, RKL, skew KL (SKL), skew reverse KL (SRKL), JSD, TVD, ISKL;
DistiLLM-2's contrastive loss (``DistiLLM2Loss``: SKL on teacher responses, SRKL on the student's).

Dense and chunked logits go through the classes in ``divergences``; ``FusedLinearDivergence``
takes hidden states and output weights and never materialises the full logits.
"""

from distillm_tune.losses.contrastive import DistiLLM2Loss
from distillm_tune.losses.divergences import (
    DIVERGENCES,
    Divergence,
    ForwardKLLoss,
    InterpolatedSkewKLLoss,
    JSDLoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    TVDLoss,
    get_divergence,
    shared_vocab_size,
)
from distillm_tune.losses.fused import FusedLinearDivergence

__all__ = [
    "DIVERGENCES",
    "DistiLLM2Loss",
    "Divergence",
    "ForwardKLLoss",
    "FusedLinearDivergence",
    "InterpolatedSkewKLLoss",
    "JSDLoss",
    "ReverseKLLoss",
    "SkewForwardKLLoss",
    "SkewReverseKLLoss",
    "TVDLoss",
    "get_divergence",
    "shared_vocab_size",
]
