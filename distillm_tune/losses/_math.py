"""Per-token divergence math, in one place.

Every front end (dense logits, chunked logits, fused hidden states) calls these functions on
``[N, V]`` log-probabilities and gets ``[N]`` per-token divergences back. They are written in log
space so that nothing is ever computed as ``0 * log(0)``:

* a term whose probability is 0 (``-inf`` log-probability) contributes exactly 0;
* a mixture is built as ``logaddexp(log w + log p, log(1 - w) + log q)``, never as
  ``log(w * p + (1 - w) * q)``: with fp32 probabilities both summands underflow to 0 about 104
  nats below the row maximum, and ``log(0) = -inf`` times ``0`` is the NaN the paper's reference
  code produces;
* for plain KL(a ‖ b) a token where ``a > 0`` but ``b == 0`` (the second model put ``-inf`` on
  a token the first allows) would be ``+inf``; such terms are left out, as torchtune's KD losses
  do, so that a masked vocabulary entry on one side cannot kill the run. Skewed divergences never
  hit this case: their mixture is positive wherever the first argument is.

Gradients flow through every occurrence of the student distribution, including the one inside
the mixture (paper Eq. 6-7); ``torch.where`` keeps the masked branches out of the backward pass.
"""

import math

import torch
from torch import Tensor


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) = Σ_v a_v (log a_v − log b_v) for each row, from log-probabilities."""
    valid = torch.isfinite(log_a) & torch.isfinite(log_b)
    log_ratio = torch.where(valid, log_a - log_b, 0.0)
    return (log_a.exp() * log_ratio).sum(-1)


def log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(w a + (1 − w) b), elementwise, without ever forming the probabilities."""
    if weight_a == 0.0:
        return log_b
    if weight_a == 1.0:
        return log_a
    la = log_a + math.log(weight_a)
    lb = log_b + math.log1p(-weight_a)
    # logaddexp(-inf, -inf) is -inf but its gradient is NaN (exp(-inf - -inf)): route such
    # entries around it.
    both_zero = torch.isneginf(la) & torch.isneginf(lb)
    mixed = torch.logaddexp(torch.where(both_zero, 0.0, la), torch.where(both_zero, 0.0, lb))
    return torch.where(both_zero, float("-inf"), mixed)


def forward_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """KL(p ‖ q): teacher p, student q."""
    return kl(log_p, log_q)


def reverse_kl(log_q: Tensor, log_p: Tensor) -> Tensor:
    """KL(q ‖ p)."""
    return kl(log_q, log_p)


def skew_forward_kl(log_q: Tensor, log_p: Tensor, alpha: float) -> Tensor:
    """SKL(α) = KL(p ‖ α p + (1 − α) q)."""
    return kl(log_p, log_mixture(log_p, log_q, alpha))


def skew_reverse_kl(log_q: Tensor, log_p: Tensor, alpha: float) -> Tensor:
    """SRKL(α) = KL(q ‖ (1 − α) p + α q)."""
    return kl(log_q, log_mixture(log_p, log_q, 1.0 - alpha))


def generalized_jsd(log_q: Tensor, log_p: Tensor, beta: float) -> Tensor:
    """JSD(β) = β KL(p ‖ m) + (1 − β) KL(q ‖ m), m = β p + (1 − β) q (paper Eq. 4)."""
    log_m = log_mixture(log_p, log_q, beta)
    return beta * kl(log_p, log_m) + (1.0 - beta) * kl(log_q, log_m)


def total_variation(log_q: Tensor, log_p: Tensor) -> Tensor:
    """TVD = ½ Σ |p − q|."""
    return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)


def interpolated_skew_kl(log_q: Tensor, log_p: Tensor, alpha: float, beta: float) -> Tensor:
    """ISKL = β SKL(α) + (1 − β) SRKL(α) (paper App. E.6)."""
    return beta * skew_forward_kl(log_q, log_p, alpha) + (1.0 - beta) * skew_reverse_kl(
        log_q, log_p, alpha
    )
