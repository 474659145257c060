"""Token-level distillation divergences as torchtune loss components.

Each class is a small ``nn.Module`` usable from a torchtune config, e.g.::

    loss:
      _component_: distillm_tune.losses.SkewReverseKLLoss
      alpha: 0.1

``forward(student_logits, teacher_logits, labels)`` takes ``[B, S, V]`` logits, or lists of
chunks along S as produced by torchtune's ``model.set_num_output_chunks(k)``, and ``labels``
``[B, S]`` already aligned with the logits. It returns the true divergence (entropy term
included), summed over the vocabulary and averaged over the tokens whose label is not
``ignore_index``. ``sum_and_count`` returns the unnormalised sum and the token count instead, so
that gradient accumulation and data parallelism can divide by the token count of the whole step.

The math lives in ``_math.py``; this file only handles shapes, masking, temperature, vocabulary
slicing and the fp32 upcast.
"""

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from distillm_tune.losses import _math

Logits = Union[Tensor, Sequence[Tensor]]


def _check_alpha(alpha: float) -> float:
    if not 0.0 <= float(alpha) < 1.0:
        raise ValueError(f"alpha must lie in [0, 1), got {alpha!r} (paper default 0.1)")
    return float(alpha)


def _check_beta(beta: float) -> float:
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1], got {beta!r}")
    return float(beta)


def shared_vocab_size(student_vocab: int, teacher_vocab: int, vocab_size: Optional[int]) -> int:
    """The number of vocabulary entries both distributions are compared over.

    Models with the same tokenizer can still have different embedding sizes (OPT: 50272 rows for
    50265 tokens; T5: 32128 for 32100): the caller then passes the real ``vocab_size`` and both
    sides are sliced to it. Without it, different sizes mean different tokenizers: a hard error,
    raised here rather than as a shape error deep in the loss.
    """
    if vocab_size is None:
        if student_vocab != teacher_vocab:
            raise ValueError(
                f"student logits have vocab size {student_vocab} but teacher logits have "
                f"{teacher_vocab}: distillation needs one tokenizer. If only the embedding "
                "tables are padded (e.g. OPT 50272 rows for 50265 tokens), pass vocab_size="
                "<real shared vocab size> to slice both."
            )
        return student_vocab
    if not 0 < vocab_size <= min(student_vocab, teacher_vocab):
        raise ValueError(
            f"vocab_size={vocab_size} must be in [1, min(student {student_vocab}, "
            f"teacher {teacher_vocab})]"
        )
    return vocab_size


class Divergence(nn.Module):
    """Base class: subclasses implement ``per_token(log_q, log_p) -> (value [N], qg [N, V])``.

    Args:
        temperature: divides both logit sets before the softmax.
        ignore_index: label value of positions that do not count (prompt, padding).
        vocab_size: the real shared vocabulary size when the embedding tables are padded;
            ``None`` requires equal sizes.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        ignore_index: int = -100,
        vocab_size: Optional[int] = None,
    ):
        super().__init__()
        if not float(temperature) > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)
        self.ignore_index = ignore_index
        self.vocab_size = vocab_size

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tuple[Tensor, Tensor]:  # pragma: no cover
        """``(value [N], q ⊙ ∂value/∂q [N, V])`` from log-probabilities; see ``_math``."""
        raise NotImplementedError

    def log_probs(self, logits: Tensor, vocab: int) -> Tensor:
        """Temperature-scaled log-softmax over the first ``vocab`` entries, at least in fp32."""
        dtype = torch.promote_types(logits.dtype, torch.float32)
        logits = logits[..., :vocab].to(dtype)
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return torch.log_softmax(logits, dim=-1)

    def value_and_grad(
        self, student_rows: Tensor, teacher_rows: Tensor, vocab: int, need_grad: bool = True
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """Summed divergence of ``[N, V]`` logit rows that all count, and its gradient with
        respect to the first ``vocab`` student logits (``[N, vocab]``, fp32 or wider)."""
        values, grad = self.token_values_and_grad(student_rows, teacher_rows, vocab, need_grad)
        return values.sum(), grad

    def token_values_and_grad(
        self, student_rows: Tensor, teacher_rows: Tensor, vocab: int, need_grad: bool = True,
        alpha: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """As ``value_and_grad``, but the value of each row (``[N]``). ``alpha`` (``[N]``): a skew
        weight per row instead of the module's ``alpha`` (skew divergences only)."""
        log_q = self.log_probs(student_rows, vocab)
        log_p = self.log_probs(teacher_rows, vocab)
        extra = {} if alpha is None else {"alpha": alpha.to(log_q.dtype)[:, None]}
        value, qg = self.per_token(log_q, log_p, **extra)
        del log_p
        grad = _math.logit_grad(log_q, qg, self.temperature) if need_grad else None
        return value, grad

    def compile_kernel(self) -> None:
        """``torch.compile`` the per-chunk value and gradient (the recipe's ``compile: true``):
        softmaxes, formula and gradient fuse into fewer passes over the ``[N, V]`` rows."""
        # the per-row kernel under both value_and_grad (fused path) and the logits path's autograd function
        self.token_values_and_grad = torch.compile(self.token_values_and_grad, dynamic=True)

    def rows_sum(self, student_rows: Tensor, teacher_rows: Tensor) -> Tensor:
        """Differentiable sum of per-token divergences over ``[N, V]`` rows that all count."""
        vocab = shared_vocab_size(student_rows.shape[-1], teacher_rows.shape[-1], self.vocab_size)
        return _TokenDivergence.apply(student_rows, teacher_rows.detach(), self, vocab, None).sum()

    def row_sums_and_counts(
        self, student_logits: Logits, teacher_logits: Logits, labels: Tensor, alpha: Optional[Tensor] = None
    ) -> Tuple[Tensor, Tensor]:
        """Per sequence: the divergence summed over its unmasked tokens (``[B]``, differentiable)
        and their number (``[B]``). ``alpha`` (``[B]``, no gradient): one skew weight per
        sequence in place of the module's ``alpha`` (skew divergences only: DistiLLM-2's
        adaptive α)."""
        if alpha is not None:
            if not hasattr(self, "alpha"):
                raise ValueError(f"{type(self).__name__} has no skew alpha; a per-sequence alpha needs SKL or SRKL")
            if alpha.shape != labels.shape[:1]:
                raise ValueError(f"alpha has shape {tuple(alpha.shape)}; expected one per sequence {tuple(labels.shape[:1])}")
            alpha = alpha.detach()
            if not bool(((alpha >= 0) & (alpha < 1)).all()):
                raise ValueError(f"alpha must lie in [0, 1), got {alpha.tolist()}")
        s_chunks, t_chunks, l_chunks = _align_chunks(student_logits, teacher_logits, labels)
        if labels.dim() != 2:
            raise ValueError(f"per-sequence sums need [B, S] labels, got shape {tuple(labels.shape)}")
        rows = torch.arange(labels.shape[0], device=labels.device)
        sums, counts = None, (labels != self.ignore_index).sum(-1)
        for s, t, lab in zip(s_chunks, t_chunks, l_chunks):
            keep = lab != self.ignore_index
            row_of = rows[:, None].expand_as(lab)[keep]
            s_rows, t_rows = s[keep], t[keep]
            vocab = shared_vocab_size(s_rows.shape[-1], t_rows.shape[-1], self.vocab_size)
            token_alpha = None if alpha is None else alpha.to(row_of.device)[row_of]
            values = _TokenDivergence.apply(s_rows, t_rows.detach(), self, vocab, token_alpha)
            part = torch.zeros(labels.shape[0], dtype=values.dtype, device=values.device).index_add(0, row_of.to(values.device), values)
            sums = part if sums is None else sums + part
        return sums, counts.to(sums.device)

    def sum_and_count(
        self, student_logits: Logits, teacher_logits: Logits, labels: Tensor
    ) -> Tuple[Tensor, Tensor]:
        """Unnormalised divergence summed over unmasked tokens, and their number."""
        s_chunks, t_chunks, l_chunks = _align_chunks(student_logits, teacher_logits, labels)
        total, count = None, None
        for s, t, lab in zip(s_chunks, t_chunks, l_chunks):
            keep = lab.reshape(-1) != self.ignore_index
            s_rows = s.reshape(-1, s.shape[-1])[keep]
            t_rows = t.reshape(-1, t.shape[-1])[keep]
            part = self.rows_sum(s_rows, t_rows)
            total = part if total is None else total + part
            n = keep.sum()
            count = n if count is None else count + n
        return total, count

    def forward(self, student_logits: Logits, teacher_logits: Logits, labels: Tensor) -> Tensor:
        total, count = self.sum_and_count(student_logits, teacher_logits, labels)
        # An all-masked batch gives 0 (with a graph, so backward still works), not 0/0.
        return total / count.clamp(min=1)


class _TokenDivergence(torch.autograd.Function):
    """Per-row divergence values ``[N]``; keeps only the logits gradient for backward, not every
    intermediate of the formula."""

    @staticmethod
    def forward(ctx, student_rows, teacher_rows, divergence, vocab, alpha):
        values, grad = divergence.token_values_and_grad(
            student_rows, teacher_rows, vocab, need_grad=ctx.needs_input_grad[0], alpha=alpha
        )
        if grad is not None:
            if vocab < student_rows.shape[-1]:  # padded embedding rows get no gradient
                grad = nn.functional.pad(grad, (0, student_rows.shape[-1] - vocab))
            ctx.save_for_backward(grad.to(student_rows.dtype))
        return values

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype)[:, None], None, None, None, None


def _as_chunks(x: Logits) -> List[Tensor]:
    return [x] if isinstance(x, Tensor) else list(x)


def _align_chunks(
    student_logits: Logits, teacher_logits: Logits, labels: Tensor
) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
    """Split student, teacher and labels into matching chunks along the sequence.

    Either side may come as one tensor or as torchtune's list of chunks along dim 1; the other
    side and the labels are split at the same boundaries.
    """
    s_chunks, t_chunks = _as_chunks(student_logits), _as_chunks(teacher_logits)
    if len(s_chunks) == 0 or len(t_chunks) == 0:
        raise ValueError("logits must be a tensor or a non-empty list of chunks")
    seq_dim = s_chunks[0].dim() - 2  # [B, S, V] -> 1; [N, V] -> 0
    reference = s_chunks if len(s_chunks) >= len(t_chunks) else t_chunks
    sizes = [c.shape[seq_dim] for c in reference]

    def split(chunks: List[Tensor], name: str) -> List[Tensor]:
        if len(chunks) == len(sizes):
            return chunks
        if len(chunks) != 1:
            raise ValueError(
                f"{name} logits come in {len(chunks)} chunks but the other side in {len(sizes)}"
            )
        return list(chunks[0].split(sizes, dim=seq_dim))

    s_chunks, t_chunks = split(s_chunks, "student"), split(t_chunks, "teacher")
    total = sum(sizes)
    if labels.dim() != seq_dim + 1 or labels.shape[seq_dim] != total:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape "
            f"{tuple(s_chunks[0].shape[:seq_dim])} x {total} x V"
        )
    for s, t in zip(s_chunks, t_chunks):
        if s.shape[:-1] != t.shape[:-1]:
            raise ValueError(
                f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} "
                "differ in batch or sequence size"
            )
    return s_chunks, t_chunks, list(labels.split(sizes, dim=seq_dim))


class ForwardKLLoss(Divergence):
    """KL(p ‖ q), teacher p, student q: classic (Hinton) KD."""

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tuple[Tensor, Tensor]:
        return _math.forward_kl(log_q, log_p)


class ReverseKLLoss(Divergence):
    """KL(q ‖ p): mode seeking (MiniLLM / GKD)."""

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tuple[Tensor, Tensor]:
        return _math.reverse_kl(log_q, log_p)


class SkewForwardKLLoss(Divergence):
    """SKL(α) = KL(p ‖ α p + (1 − α) q); α = 0 is forward KL. Paper default α = 0.1."""

    def __init__(self, alpha: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.alpha = _check_alpha(alpha)

    def per_token(self, log_q: Tensor, log_p: Tensor, alpha=None) -> Tuple[Tensor, Tensor]:
        return _math.skew_forward_kl(log_q, log_p, self.alpha if alpha is None else alpha)


class SkewReverseKLLoss(Divergence):
    """SRKL(α) = KL(q ‖ (1 − α) p + α q); α = 0 is reverse KL. Paper default α = 0.1.

    ``stop_grad_mixture=True``: the student's copy inside the mixture is a constant,
    KL(q ‖ (1 − α) p + α sg(q)), as DistiLLM-2 trains it (same value, another gradient;
    DISTILLM2_SPEC §2.1). The default differentiates through it, as DistiLLM-1 does.
    """

    def __init__(self, alpha: float = 0.1, stop_grad_mixture: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.alpha = _check_alpha(alpha)
        if not isinstance(stop_grad_mixture, bool):
            raise ValueError(f"stop_grad_mixture must be true or false, got {stop_grad_mixture!r}")
        self.stop_grad_mixture = stop_grad_mixture

    def per_token(self, log_q: Tensor, log_p: Tensor, alpha=None) -> Tuple[Tensor, Tensor]:
        return _math.skew_reverse_kl(log_q, log_p, self.alpha if alpha is None else alpha, self.stop_grad_mixture)


class JSDLoss(Divergence):
    """Generalised JSD(β) = β KL(p ‖ m) + (1 − β) KL(q ‖ m), m = β p + (1 − β) q (paper Eq. 4).

    TRL's GKD ``beta`` is this β. The paper's GKD numbers come from m = 0.1 p + 0.9 q, i.e.
    β = 0.1 in this convention (the text says 0.9): the ``gkd`` preset uses 0.1.
    """

    def __init__(self, beta: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.beta = _check_beta(beta)

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tuple[Tensor, Tensor]:
        return _math.generalized_jsd(log_q, log_p, self.beta)


class TVDLoss(Divergence):
    """Total variation distance ½ Σ |p − q|."""

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tuple[Tensor, Tensor]:
        return _math.total_variation(log_q, log_p)


class InterpolatedSkewKLLoss(Divergence):
    """ISKL = β SKL(α) + (1 − β) SRKL(α) (paper App. E.6)."""

    def __init__(self, alpha: float = 0.1, beta: float = 0.5, **kwargs):
        super().__init__(**kwargs)
        self.alpha = _check_alpha(alpha)
        self.beta = _check_beta(beta)

    def per_token(self, log_q: Tensor, log_p: Tensor) -> Tuple[Tensor, Tensor]:
        return _math.interpolated_skew_kl(log_q, log_p, self.alpha, self.beta)


DIVERGENCES = {
    "fkl": ForwardKLLoss,
    "rkl": ReverseKLLoss,
    "skl": SkewForwardKLLoss,
    "srkl": SkewReverseKLLoss,
    "jsd": JSDLoss,
    "tvd": TVDLoss,
    "iskl": InterpolatedSkewKLLoss,
}


def get_divergence(name: str, **kwargs) -> Divergence:
    """Build a divergence by short name (``fkl``, ``rkl``, ``skl``, ``srkl``, ``jsd``, ``tvd``, ``iskl``)."""
    try:
        cls = DIVERGENCES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown divergence {name!r}; expected one of {sorted(DIVERGENCES)}"
        ) from None
    return cls(**kwargs)
