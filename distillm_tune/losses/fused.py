"""Divergence (and cross-entropy) straight from hidden states: the ``[tokens, V]`` logits are
never held whole.

In a KD step the logits are the memory peak: student and teacher each produce ``[B, S, V]``
(V = 32k-250k), upcast to fp32, plus their softmaxes and the gradient. The fused path takes the
final hidden states and output-projection weights of both models instead, walks the tokens in
chunks, and for each chunk computes the logits, the divergence, the student's cross-entropy
against the labels (the hard term) and the gradient of ``kd_ratio·D + (1−kd_ratio)·CE`` with
respect to the chunk's student logits; it then folds that gradient into the gradients of the
student hidden states and output weight right away and drops the chunk. Only ``[chunk, V]``
tensors exist at any time. The gradients are computed during the forward pass (as Liger-Kernel's
fused linear losses, hard and soft term in one pass, do), so the backward pass only scales them by
the incoming gradient.

The per-token math of the divergence is the same ``Divergence.per_token`` the dense and chunked
paths use; the cross-entropy is over all the student's logits (its whole embedding, padded rows
included), like ``cross_entropy_sum_and_count`` of the logits path.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from distillm_tune.losses.divergences import Divergence, shared_vocab_size


class _FusedLinearLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, targets, divergence, vocab,
                chunk_size, kd_ratio):
        # s_hidden [N, Hs] and targets [N] hold only the tokens that count; weights are [V_model, H].
        # Returns (kd_ratio·D + (1−kd_ratio)·CE, D, CE) summed over the N tokens; only the first has
        # a gradient.
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        need_grad = need_hidden or need_weight or need_bias
        ce_grad = need_grad and kd_ratio != 1.0   # the hard term trains: all V_model logits get a gradient
        div_grad = need_grad and kd_ratio != 0.0
        # logit columns with a gradient: the shared vocabulary (divergence), or every row (CE)
        cols = s_weight.shape[0] if ce_grad else vocab
        grad_hidden = torch.empty_like(s_hidden) if need_hidden else None
        acc_dtype = torch.promote_types(s_weight.dtype, torch.float32)
        w = s_weight[:cols]
        grad_w = torch.zeros(w.shape, dtype=acc_dtype, device=w.device) if need_weight else None
        grad_b = torch.zeros(cols, dtype=acc_dtype, device=w.device) if need_bias else None
        div_total = torch.zeros((), dtype=acc_dtype, device=s_hidden.device)
        ce_total = torch.zeros((), dtype=acc_dtype, device=s_hidden.device)
        for start in range(0, s_hidden.shape[0], chunk_size):
            h = s_hidden[start : start + chunk_size]
            tgt = targets[start : start + chunk_size]
            with torch.no_grad():
                t_logits = nn.functional.linear(
                    t_hidden[start : start + chunk_size],
                    t_weight[:vocab],
                    None if t_bias is None else t_bias[:vocab],
                )
                # every student logit: the CE's normaliser runs over the whole embedding
                s_logits = nn.functional.linear(h, s_weight, s_bias)
                part, g_div = divergence.value_and_grad(s_logits, t_logits, vocab, need_grad=div_grad)
                del t_logits
                z = s_logits.to(acc_dtype)
                del s_logits
                lse = torch.logsumexp(z, dim=-1)
                rows = torch.arange(z.shape[0], device=z.device)
                ce_total += (lse - z[rows, tgt]).sum()
                g = None
                if ce_grad:
                    g = z.sub_(lse[:, None]).exp_()  # softmax, in z's memory
                    g[rows, tgt] -= 1.0
                    g.mul_(1.0 - kd_ratio)
                    if g_div is not None:
                        g[:, :vocab].add_(g_div, alpha=kd_ratio)
                elif g_div is not None:
                    g = g_div if kd_ratio == 1.0 else g_div.mul_(kd_ratio)
                del z, g_div
            div_total += part
            if g is None:
                continue
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = (g.to(w.dtype) @ w).to(grad_hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(g.t().to(acc_dtype), h.to(acc_dtype))
            if grad_b is not None:
                grad_b += g.sum(0).to(acc_dtype)
            del g

        def full_rows(g, like):
            # Padded embedding rows beyond the shared vocabulary get zero gradient (kd_ratio = 1).
            if g is None:
                return None
            if like.shape[0] == g.shape[0]:
                return g.to(like.dtype)
            out = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
            out[: g.shape[0]] = g.to(like.dtype)
            return out

        grads = (grad_hidden, full_rows(grad_w, s_weight), full_rows(grad_b, s_bias))
        ctx.has_grad = tuple(g is not None for g in grads)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        if kd_ratio == 1.0:  # not 0·CE: a non-finite CE must not turn the divergence into NaN
            loss = div_total.clone()
        elif kd_ratio == 0.0:
            loss = ce_total.clone()
        else:
            loss = kd_ratio * div_total + (1.0 - kd_ratio) * ce_total
        ctx.mark_non_differentiable(div_total, ce_total)
        return loss, div_total, ce_total

    @staticmethod
    def backward(ctx, grad_loss, _grad_div, _grad_ce):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_loss if has else None for has in ctx.has_grad]
        return (*grads, None, None, None, None, None, None, None, None)


class FusedLinearDivergence(nn.Module):
    """A divergence (and the student's cross-entropy) computed from final hidden states and
    output weights, chunk by chunk.

    Args:
        divergence: any ``distillm_tune.losses`` divergence (its temperature, ignore_index and
            vocab_size are used).
        chunk_size: tokens per chunk; peak extra memory is about ``6 * chunk_size * V * 4`` bytes.

    ``forward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
    student_bias=None, teacher_bias=None)`` takes hidden states ``[B, S, H]`` (after the final
    norm, i.e. the input of the output projection), weights ``[V, H]`` as stored by ``nn.Linear``
    and ``labels`` ``[B, S]`` aligned with the logits, and returns the same value, with the same
    gradients for the student hidden states, weight and bias, as
    ``divergence(student_hidden @ W_s.T, teacher_hidden @ W_t.T, labels)``.

    ``loss_sums(..., kd_ratio=r)`` returns ``(r·D + (1−r)·CE, D, CE, count)`` as sums over the
    tokens whose label counts, from one chunked pass: the first carries the gradient of both terms
    (the CE's over all the student's logits, as ``F.cross_entropy`` of the logits has it), the
    divergence ``D`` and the cross-entropy ``CE`` come without gradient, for logging.
    """

    def __init__(self, divergence: Divergence, chunk_size: int = 1024):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.divergence = divergence
        self.chunk_size = chunk_size

    def loss_sums(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Tensor,
        student_bias: Optional[Tensor] = None,
        teacher_bias: Optional[Tensor] = None,
        kd_ratio: float = 1.0,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        if not 0.0 <= float(kd_ratio) <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {kd_ratio}")
        if student_hidden.shape[:-1] != labels.shape or teacher_hidden.shape[:-1] != labels.shape:
            raise ValueError(
                f"hidden states {tuple(student_hidden.shape)} (student) and "
                f"{tuple(teacher_hidden.shape)} (teacher) do not match labels {tuple(labels.shape)}"
            )
        for name, hidden, weight in (
            ("student", student_hidden, student_weight),
            ("teacher", teacher_hidden, teacher_weight),
        ):
            if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
                raise ValueError(
                    f"{name} output weight {tuple(weight.shape)} does not fit hidden size "
                    f"{hidden.shape[-1]}: expected [V, {hidden.shape[-1]}]"
                )
        vocab = shared_vocab_size(student_weight.shape[0], teacher_weight.shape[0], self.divergence.vocab_size)
        flat_labels = labels.reshape(-1)
        keep = flat_labels != self.divergence.ignore_index
        s_rows = student_hidden.reshape(-1, student_hidden.shape[-1])[keep]
        t_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[keep]
        loss, div, ce = _FusedLinearLoss.apply(
            s_rows,
            student_weight,
            student_bias,
            t_rows,
            teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(),
            flat_labels[keep].to(student_hidden.device),
            self.divergence,
            vocab,
            self.chunk_size,
            float(kd_ratio),
        )
        return loss, div, ce, keep.sum()

    def sum_and_count(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        labels: Tensor,
        student_bias: Optional[Tensor] = None,
        teacher_bias: Optional[Tensor] = None,
    ) -> Tuple[Tensor, Tensor]:
        """The divergence's sum (with its gradient) and the token count."""
        total, _, _, count = self.loss_sums(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                            labels, student_bias, teacher_bias, kd_ratio=1.0)
        return total, count

    def forward(self, *args, **kwargs) -> Tensor:
        total, count = self.sum_and_count(*args, **kwargs)
        return total / count.clamp(min=1)
