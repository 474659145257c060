"""Divergence straight from hidden states: the ``[tokens, V]`` logits are never held whole.

In a KD step the logits are the memory peak: student and teacher each produce ``[B, S, V]``
(V = 32k-250k), upcast to fp32, plus their softmaxes and the gradient. The fused path takes the
final hidden states and output-projection weights of both models instead, walks the tokens in
chunks, and for each chunk computes the logits, the divergence and the gradient with respect to
the chunk's student logits; it then folds that gradient into the gradients of the student hidden
states and output weight right away and drops the chunk. Only ``[chunk, V]`` tensors exist at
any time. The gradients are computed during the forward pass (as Liger-Kernel's fused linear
losses do), so the backward pass only scales them by the incoming gradient.

The per-token math is the same ``Divergence.per_token`` the dense and chunked paths use.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from distillm_tune.losses.divergences import Divergence, shared_vocab_size


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s_hidden, s_weight, s_bias, t_hidden, t_weight, t_bias, divergence, vocab, chunk_size):
        # s_hidden [N, Hs] holds only the tokens that count; weights are [V_model, H].
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(s_hidden) if need_hidden else None
        acc_dtype = torch.promote_types(s_weight.dtype, torch.float32)
        w = s_weight[:vocab]
        grad_w = torch.zeros(w.shape, dtype=acc_dtype, device=w.device) if need_weight else None
        grad_b = (
            torch.zeros(vocab, dtype=acc_dtype, device=w.device)
            if need_bias
            else None
        )
        total = torch.zeros((), dtype=acc_dtype, device=s_hidden.device)
        for start in range(0, s_hidden.shape[0], chunk_size):
            h = s_hidden[start : start + chunk_size]
            with torch.no_grad():
                t_logits = nn.functional.linear(
                    t_hidden[start : start + chunk_size],
                    t_weight[:vocab],
                    None if t_bias is None else t_bias[:vocab],
                )
                s_logits = nn.functional.linear(h, w, None if s_bias is None else s_bias[:vocab])
                part, g_logits = divergence.value_and_grad(
                    s_logits, t_logits, vocab, need_grad=any(ctx.needs_input_grad[:3])
                )
                del t_logits, s_logits
            total += part
            if g_logits is None:
                continue
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = (g_logits.to(w.dtype) @ w).to(grad_hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(g_logits.t().to(acc_dtype), h.to(acc_dtype))
            if grad_b is not None:
                grad_b += g_logits.sum(0).to(acc_dtype)
            del g_logits

        def full_rows(g, like):
            # Padded embedding rows beyond the shared vocabulary get zero gradient.
            if g is None:
                return None
            if like.shape[0] == vocab:
                return g.to(like.dtype)
            out = torch.zeros(like.shape, dtype=like.dtype, device=like.device)
            out[:vocab] = g.to(like.dtype)
            return out

        grads = (grad_hidden, full_rows(grad_w, s_weight), full_rows(grad_b, s_bias))
        ctx.has_grad = tuple(g is not None for g in grads)
        ctx.save_for_backward(*(g for g in grads if g is not None))
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_out if has else None for has in ctx.has_grad]
        return (*grads, None, None, None, None, None, None)


class FusedLinearDivergence(nn.Module):
    """A divergence computed from final hidden states and output weights, chunk by chunk.

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
    """

    def __init__(self, divergence: Divergence, chunk_size: int = 1024):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.divergence = divergence
        self.chunk_size = chunk_size

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
        keep = labels.reshape(-1) != self.divergence.ignore_index
        s_rows = student_hidden.reshape(-1, student_hidden.shape[-1])[keep]
        t_rows = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])[keep]
        total = _FusedLinearDivergence.apply(
            s_rows,
            student_weight,
            student_bias,
            t_rows,
            teacher_weight.detach(),
            None if teacher_bias is None else teacher_bias.detach(),
            self.divergence,
            vocab,
            self.chunk_size,
        )
        return total, keep.sum()

    def forward(self, *args, **kwargs) -> Tensor:
        total, count = self.sum_and_count(*args, **kwargs)
        return total / count.clamp(min=1)
