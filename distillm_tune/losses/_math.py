"""Per-token divergence math and its analytic gradient, in one place.

Every front end (dense logits, chunked logits, fused hidden states) calls these functions on
``[N, V]`` log-probabilities ``log_q`` (student) and ``log_p`` (teacher). Each returns

* ``value`` ``[N]``: the true divergence of each token (entropy terms included), and
* ``qg`` ``[N, V]``: ``q ⊙ ∂value/∂q``, from which the gradient with respect to the student
  logits follows as ``qg − q · Σ_v qg`` (the softmax Jacobian).

Computing the gradient in the forward pass (as Liger-Kernel does) means autograd keeps one
``[N, V]`` tensor per chunk instead of every intermediate of the formula, and lets the fused
path fold it into the hidden-state gradient right away. The derivations are in the comments;
the tests check them against float64 autograd of the naive formulas and finite differences.

Numerics: everything is in log space, so nothing is ever ``0 * log(0)``:

* a term whose probability is 0 (``-inf`` log-probability) contributes exactly 0, while a NaN
  input (a broken model) gives a NaN value, never a silent 0;
* a mixture is ``logaddexp(log w + log p, log(1 - w) + log q)``, never ``log(w p + (1 - w) q)``:
  fp32 probabilities underflow to 0 about 104 nats below the row maximum, and the reference
  code's ``log`` of that is the NaN this avoids;
* for plain KL(a ‖ b), a token with ``a > 0`` but ``b = 0`` (one model put ``-inf`` on a token
  the other allows) would be ``+inf``; such terms are left out, as torchtune's KD losses do, so
  a masked vocabulary entry on one side cannot kill the run. Skewed divergences never hit this:
  their mixture is positive wherever the first argument is.
"""

import math
from typing import Tuple, Union

import torch
from torch import Tensor

Pair = Tuple[Tensor, Tensor]
# A skew or mixture weight: one number, or a tensor broadcasting against ``[N, V]`` (``[N, 1]``:
# one weight per token, e.g. DistiLLM-2's per-sequence adaptive α repeated over its tokens).
Weight = Union[float, Tensor]


def _where(cond: Tensor, x: Tensor) -> Tensor:
    return torch.where(cond, x, 0.0)


def _finite(*xs: Tensor) -> Tensor:
    """True where no log-probability is -inf (zero probability). NaN counts as finite here on
    purpose: a NaN logit must make the loss NaN, which the recipe detects, not vanish into a
    masked 0 that trains on nothing."""
    out = ~torch.isneginf(xs[0])
    for x in xs[1:]:
        out &= ~torch.isneginf(x)
    return out


def log_mixture(log_a: Tensor, log_b: Tensor, weight_a: Weight) -> Tensor:
    """log(w a + (1 − w) b), elementwise, without ever forming the probabilities."""
    if isinstance(weight_a, Tensor):
        w = weight_a.to(log_a.dtype)
        la = log_a + torch.log(w)  # w = 0 gives -inf: that side drops out below
        lb = log_b + torch.log1p(-w)
    else:
        if weight_a == 0.0:
            return log_b
        if weight_a == 1.0:
            return log_a
        la = log_a + math.log(weight_a)
        lb = log_b + math.log1p(-weight_a)
    both_zero = torch.isneginf(la) & torch.isneginf(lb)
    # logaddexp(-inf, -inf) would be -inf - -inf = NaN inside; keep such entries out of it.
    mixed = torch.logaddexp(_where(~both_zero, la), _where(~both_zero, lb))
    return mixed.masked_fill_(both_zero, float("-inf"))


def forward_kl(log_q: Tensor, log_p: Tensor) -> Pair:
    """KL(p ‖ q) = Σ p (log p − log q).   ∂/∂q_v = −p_v / q_v  ⇒  qg = −p."""
    valid = _finite(log_q, log_p)
    p = log_p.exp()
    value = (p * _where(valid, log_p - log_q)).sum(-1)
    return value, -_where(valid, p)


def reverse_kl(log_q: Tensor, log_p: Tensor) -> Pair:
    """KL(q ‖ p) = Σ q (log q − log p).   ∂/∂q_v = log q_v − log p_v + 1."""
    valid = _finite(log_q, log_p)
    q = log_q.exp()
    r = _where(valid, log_q - log_p)
    return (q * r).sum(-1), _where(valid, q * (r + 1.0))


def skew_forward_kl(log_q: Tensor, log_p: Tensor, alpha: Weight) -> Pair:
    """SKL(α) = KL(p ‖ m), m = α p + (1 − α) q.   ∂/∂q_v = −(1 − α) p_v / m_v."""
    log_m = log_mixture(log_p, log_q, alpha)
    valid = _finite(log_p, log_m)
    value = (log_p.exp() * _where(valid, log_p - log_m)).sum(-1)
    both = valid & torch.isfinite(log_q)
    qg = -(1.0 - alpha) * _where(both, _where(both, log_q + log_p - log_m).exp())
    return value, qg


def skew_reverse_kl(log_q: Tensor, log_p: Tensor, alpha: Weight, stop_grad_mixture: bool = False) -> Pair:
    """SRKL(α) = KL(q ‖ m), m = (1 − α) p + α q.   ∂/∂q_v = log(q_v/m_v) + 1 − α q_v / m_v.

    ``stop_grad_mixture``: the student's copy inside m is a constant, m = (1 − α) p + α sg(q)
    (DistiLLM-2, DISTILLM2_SPEC §2.1; DistiLLM-1 differentiates through it). Same value; the last
    term of the derivative goes: ∂/∂q_v = log(q_v/m_v) + 1, so the logit gradient is
    q_k (g_k − Σ_v q_v g_v) with g = log q − log m.
    """
    log_m = log_mixture(log_p, log_q, 1.0 - alpha)
    valid = _finite(log_q, log_m)
    q = log_q.exp()
    r = _where(valid, log_q - log_m)
    if stop_grad_mixture:
        return (q * r).sum(-1), _where(valid, q * (r + 1.0))
    return (q * r).sum(-1), _where(valid, q * (r + 1.0 - alpha * r.exp()))


def generalized_jsd(log_q: Tensor, log_p: Tensor, beta: float) -> Pair:
    """JSD(β) = β KL(p ‖ m) + (1 − β) KL(q ‖ m), m = β p + (1 − β) q (paper Eq. 4).

    ∂/∂q_v = −β(1−β) p_v/m_v + (1−β)(log(q_v/m_v) + 1 − (1−β) q_v/m_v) = (1−β) log(q_v/m_v),
    because β p_v + (1 − β) q_v = m_v.
    """
    log_m = log_mixture(log_p, log_q, beta)
    valid_p = _finite(log_p, log_m)
    valid_q = _finite(log_q, log_m)
    q = log_q.exp()
    r_q = _where(valid_q, log_q - log_m)
    value = beta * (log_p.exp() * _where(valid_p, log_p - log_m)).sum(-1) + (1.0 - beta) * (q * r_q).sum(-1)
    return value, (1.0 - beta) * q * r_q


def total_variation(log_q: Tensor, log_p: Tensor) -> Pair:
    """TVD = ½ Σ |p − q|.   ∂/∂q_v = ½ sign(q_v − p_v)."""
    q, p = log_q.exp(), log_p.exp()
    diff = q - p
    return 0.5 * diff.abs().sum(-1), 0.5 * q * diff.sign()


def interpolated_skew_kl(log_q: Tensor, log_p: Tensor, alpha: float, beta: float) -> Pair:
    """ISKL = β SKL(α) + (1 − β) SRKL(α) (paper App. E.6)."""
    v1, g1 = skew_forward_kl(log_q, log_p, alpha)
    v2, g2 = skew_reverse_kl(log_q, log_p, alpha)
    return beta * v1 + (1.0 - beta) * v2, beta * g1 + (1.0 - beta) * g2


def logit_grad(log_q: Tensor, qg: Tensor, temperature: float) -> Tensor:
    """∂value/∂logits from qg = q ⊙ ∂value/∂q through softmax(logits / τ)."""
    grad = qg - log_q.exp() * qg.sum(-1, keepdim=True)
    return grad / temperature if temperature != 1.0 else grad


def soft_cross_entropy(log_q: Tensor, log_p: Tensor) -> Pair:
    """H(p, q) = −Σ p log q = KL(p ‖ q) + H(p): what torchtune's ``ForwardKLLoss`` returns.

    The same gradient as ``forward_kl`` (H(p) does not depend on q): qg = −p. Entries where the
    student puts ``-inf`` are left out, as torchtune does (its mask is ``isinf(student_logits)``).
    """
    valid = _finite(log_q, log_p)
    p = log_p.exp()
    return -(p * _where(valid, log_q)).sum(-1), -_where(valid, p)
