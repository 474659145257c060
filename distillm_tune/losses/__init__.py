"""Distillation divergences: FKL, RKL, skew KL (SKL), skew reverse KL (SRKL), JSD, TVD, ISKL.

Dense and chunked logits go through the classes in ``divergences``; ``FusedLinearDivergence``
takes hidden states and output weights and never materialises the full logits.
"""

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
