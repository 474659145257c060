"""DistiLLM-2's contrastive loss (Ko et al., ICML 2025; DISTILLM2_SPEC §2) and its curricula.

A batch holds ``2B`` sequences: rows ``[0, B)`` are teacher responses y_t to prompts x_i and rows
``[B, 2B)`` the student's own responses y_s to the same prompts, in the same order. Per pair

    L_i = (2 − b) · D_SKL(α_t,i)(x_i, y_t,i) + b · D_SRKL(α_s,i)(x_i, y_s,i)

where D is the token MEAN of the per-token divergence over the response (the released code's
``average_log_prob=True``; the paper's Eq. 1 writes a sum), SKL(α) = KL(p ‖ α p + (1 − α) q) with
gradients through q in the mixture, and SRKL(α) = KL(q ‖ (1 − α) p + α sg(q)) with the student's
copy inside the mixture a constant. Both are the package's skew divergences (``SkewForwardKLLoss``
and ``SkewReverseKLLoss(stop_grad_mixture=True)``), not copies. The loss is ``mean_i L_i``; with
β = b / 2 it is 4 × the paper's Eq. 2.

The curricula are pure functions here; the recipe decides when they apply:

* ``gradual_beta_b``: b = 1 + 0.5 · min(1, 2 · step / steps) (the code's form, per generation
  round; the paper's printed β formula reaches β = 1 within epoch 1 and is not used);
* ``adaptive_alpha``: α_i = clip(1 − (1 − α0) · m / (gap_i + 1e-5), α_min, α0), gap_i = p̄_i − q̄_i
  on teacher rows and q̄_i − p̄_i on student rows, p̄, q̄ the geometric-mean probabilities of the
  response's tokens (``sequence_mean_logprob``), m the anchor (the gap's batch mean when the
  curriculum starts). α is a coefficient: it carries no gradient.
"""

from typing import Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from distillm_tune.losses.divergences import (
    Logits,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    _as_chunks,
    _check_alpha,
    shared_vocab_size,
)

GAP_EPS = 1e-5  # the released code's guard against a zero gap (DISTILLM2_SPEC §2.5)


def gradual_beta_b(step: int, steps: int) -> float:
    """SRKL weight b at ``step`` (0-based) of a round of ``steps`` optimizer steps: 1 at the start,
    rising linearly to 1.5 at the middle, then flat (β = b / 2 from 0.5 to 0.75)."""
    if steps < 1 or step < 0:
        raise ValueError(f"need step >= 0 and steps >= 1, got step={step}, steps={steps}")
    return 1.0 + 0.5 * min(1.0, 2.0 * step / steps)


def adaptive_alpha(gap: Tensor, anchor: Union[float, Tensor], alpha0: float, alpha_min: float) -> Tensor:
    """Per-sequence skew α = clip(1 − (1 − α0) · anchor / (gap + 1e-5), alpha_min, alpha0), detached.

    From the first-order approximation log(p / (α p + (1 − α) q)) ≈ (1 − α)(p − q): α is chosen so
    that (1 − α) · gap equals the anchor's (1 − α0) · m. A gap of the anchor's sign but larger
    ("hard" sample) gets a larger α; a gap of the other sign, or above 1 − (1 − α0)·m/..., is
    clipped to α0; a gap near 0 to alpha_min.
    """
    if not 0.0 <= alpha_min <= alpha0 < 1.0:
        raise ValueError(f"need 0 <= alpha_min <= alpha0 < 1, got alpha_min={alpha_min}, alpha0={alpha0}")
    gap = gap.detach().double()
    anchor = torch.as_tensor(anchor, dtype=torch.float64, device=gap.device).detach()
    alpha = 1.0 - (1.0 - alpha0) * anchor / (gap + GAP_EPS)
    # NaN (a NaN gap) would pass clamp unchanged; α0 is the safe value
    alpha = torch.nan_to_num(alpha, nan=alpha0, posinf=alpha0, neginf=alpha_min)
    return alpha.clamp(alpha_min, alpha0).float()


@torch.no_grad()
def sequence_mean_logprob(logits: Logits, labels: Tensor, ignore_index: int = -100,
                          vocab_size: Optional[int] = None, temperature: float = 1.0) -> Tensor:
    """Per sequence, the mean log-probability of its label tokens (``[B]``, fp32, no gradient):
    log of the geometric-mean token probability p̄ (teacher logits) or q̄ (student logits).
    A sequence without labelled tokens gives 0 (p̄ = 1)."""
    chunks = _as_chunks(logits)
    sizes = [c.shape[1] for c in chunks]
    total = torch.zeros(labels.shape[0], dtype=torch.float32, device=chunks[0].device)
    for c, lab in zip(chunks, labels.to(chunks[0].device).split(sizes, dim=1)):
        vocab = c.shape[-1] if vocab_size is None else vocab_size
        logp = torch.log_softmax(c[..., :vocab].float() / temperature, dim=-1)
        keep = lab != ignore_index
        picked = logp.gather(-1, lab.clamp(0, vocab - 1)[..., None])[..., 0]
        total += torch.where(keep, picked, 0.0).sum(-1)
    count = (labels != ignore_index).sum(-1).to(total.device)
    return total / count.clamp(min=1)


def _rows(logits: Logits, start: int, stop: int) -> List[Tensor]:
    return [c[start:stop] for c in _as_chunks(logits)]


class DistiLLM2Loss(nn.Module):
    """DistiLLM-2's contrastive loss over ``2B`` rows (teacher responses, then student responses).

    Args:
        alpha: α0, the skew of both terms when no per-sequence α is passed (paper: 0.1).
        temperature, ignore_index, vocab_size: as for every ``Divergence``.
    """

    def __init__(self, alpha: float = 0.1, temperature: float = 1.0, ignore_index: int = -100,
                 vocab_size: Optional[int] = None):
        super().__init__()
        self.alpha = _check_alpha(alpha)
        kw = dict(temperature=temperature, ignore_index=ignore_index, vocab_size=vocab_size)
        self.skl = SkewForwardKLLoss(alpha=self.alpha, **kw)
        self.srkl = SkewReverseKLLoss(alpha=self.alpha, stop_grad_mixture=True, **kw)
        self.ignore_index, self.vocab_size, self.temperature = ignore_index, vocab_size, self.skl.temperature

    def pair_terms(self, student_logits: Logits, teacher_logits: Logits, labels: Tensor,
                   alpha_t: Optional[Tensor] = None, alpha_s: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``{"skl": [B], "srkl": [B]}``: the token-mean SKL of each teacher row and SRKL of each
        student row (differentiable; a row without labelled tokens gives 0)."""
        rows = labels.shape[0]
        if rows % 2:
            raise ValueError(f"expected 2B rows (B teacher responses, then B student responses), got {rows}")
        b = rows // 2
        s_chunks, t_chunks = _as_chunks(student_logits), _as_chunks(teacher_logits)
        shared_vocab_size(s_chunks[0].shape[-1], t_chunks[0].shape[-1], self.vocab_size)
        skl_sum, skl_n = self.skl.row_sums_and_counts(_rows(s_chunks, 0, b), _rows(t_chunks, 0, b), labels[:b], alpha_t)
        srkl_sum, srkl_n = self.srkl.row_sums_and_counts(_rows(s_chunks, b, rows), _rows(t_chunks, b, rows),
                                                         labels[b:], alpha_s)
        return {"skl": skl_sum / skl_n.clamp(min=1), "srkl": srkl_sum / srkl_n.clamp(min=1)}

    def pair_losses(self, student_logits: Logits, teacher_logits: Logits, labels: Tensor, b: float = 1.0,
                    alpha_t: Optional[Tensor] = None, alpha_s: Optional[Tensor] = None) -> Dict[str, Tensor]:
        """``pair_terms`` plus ``"loss"``: L_i = (2 − b) · skl_i + b · srkl_i (``[B]``)."""
        if not 0.0 <= float(b) <= 2.0:
            raise ValueError(f"b must lie in [0, 2], got {b!r}")
        terms = self.pair_terms(student_logits, teacher_logits, labels, alpha_t, alpha_s)
        terms["loss"] = (2.0 - b) * terms["skl"] + b * terms["srkl"]
        return terms

    def forward(self, student_logits: Logits, teacher_logits: Logits, labels: Tensor, b: float = 1.0,
                alpha_t: Optional[Tensor] = None, alpha_s: Optional[Tensor] = None) -> Tensor:
        return self.pair_losses(student_logits, teacher_logits, labels, b, alpha_t, alpha_s)["loss"].mean()
