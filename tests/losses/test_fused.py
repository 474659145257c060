"""The fused hidden-state path gives the dense path's value and gradients."""

import pytest
import torch
from torch.nn import functional as F

from distillm_tune.losses import (
    ForwardKLLoss,
    FusedLinearDivergence,
    InterpolatedSkewKLLoss,
    JSDLoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    TVDLoss,
)

DIVERGENCES = [
    ForwardKLLoss(),
    ReverseKLLoss(),
    SkewForwardKLLoss(alpha=0.1),
    SkewReverseKLLoss(alpha=0.1, temperature=1.5),
    JSDLoss(beta=0.1),
    TVDLoss(),
    InterpolatedSkewKLLoss(alpha=0.2, beta=0.4),
]


def make(b=3, s=9, hs=16, ht=24, v=37, v_teacher=None, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    v_teacher = v_teacher or v
    x = {
        "student_hidden": torch.randn(b, s, hs, generator=g),
        "student_weight": torch.randn(v, hs, generator=g) / hs**0.5 * 3,
        "teacher_hidden": torch.randn(b, s, ht, generator=g),
        "teacher_weight": torch.randn(v_teacher, ht, generator=g) / ht**0.5 * 3,
        "student_bias": torch.randn(v, generator=g) if bias else None,
        "teacher_bias": torch.randn(v_teacher, generator=g) if bias else None,
    }
    x = {k: (t.to(dtype) if t is not None else None) for k, t in x.items()}
    labels = torch.randint(0, min(v, v_teacher), (b, s), generator=g)
    labels[0, :4] = -100
    labels[1, -3:] = -100
    return x, labels


def leaves(x):
    return {k: t.clone().requires_grad_(True) if t is not None and k.startswith("student") else t for k, t in x.items()}


def dense(div, x, labels):
    s_logits = F.linear(x["student_hidden"], x["student_weight"], x["student_bias"])
    t_logits = F.linear(x["teacher_hidden"], x["teacher_weight"], x["teacher_bias"])
    return div(s_logits, t_logits, labels)


@pytest.mark.parametrize("div", DIVERGENCES, ids=lambda d: type(d).__name__)
@pytest.mark.parametrize("chunk_size", [4, 1024])
def test_fused_equals_dense_value_and_gradients(div, chunk_size):
    x, labels = make()
    a, b = leaves(x), leaves(x)
    ref = dense(div, a, labels)
    fused = FusedLinearDivergence(div, chunk_size=chunk_size)(labels=labels, **b)
    ref.backward()
    fused.backward()
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    for k in ("student_hidden", "student_weight", "student_bias"):
        torch.testing.assert_close(b[k].grad, a[k].grad, rtol=1e-4, atol=1e-6, msg=k)


def test_fused_gradient_scales_with_upstream_gradient_and_accumulates():
    div = SkewReverseKLLoss()
    x, labels = make(seed=1)
    a, b = leaves(x), leaves(x)
    (3.0 * dense(div, a, labels) + dense(div, a, labels)).backward()
    fused = FusedLinearDivergence(div, chunk_size=5)
    (3.0 * fused(labels=labels, **b) + fused(labels=labels, **b)).backward()
    torch.testing.assert_close(b["student_weight"].grad, a["student_weight"].grad, rtol=1e-4, atol=1e-6)


def test_fused_with_padded_embedding_rows_and_vocab_size():
    """OPT-style: student and teacher embeddings padded differently; rows past vocab_size get no gradient."""
    div = SkewForwardKLLoss(vocab_size=37)
    x, labels = make(v=40, v_teacher=43, seed=2)
    a, b = leaves(x), leaves(x)
    dense(div, a, labels).backward()
    FusedLinearDivergence(div, chunk_size=6)(labels=labels, **b).backward()
    torch.testing.assert_close(b["student_weight"].grad, a["student_weight"].grad, rtol=1e-4, atol=1e-6)
    assert torch.all(b["student_weight"].grad[37:] == 0)
    with pytest.raises(ValueError, match=r"40.*43"):
        FusedLinearDivergence(SkewForwardKLLoss())(labels=labels, **x)


def test_fused_finite_differences_float64():
    div = SkewReverseKLLoss(alpha=0.3)
    x, labels = make(b=2, s=3, hs=4, ht=5, v=7, seed=3, dtype=torch.float64)
    fused = FusedLinearDivergence(div, chunk_size=2)

    def f(h, w, bias):
        return fused(h, w, x["teacher_hidden"], x["teacher_weight"], labels, bias, x["teacher_bias"])

    inputs = tuple(x[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias"))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_fused_bf16_weights_fp32_loss():
    div = SkewReverseKLLoss()
    x, labels = make(seed=4, dtype=torch.bfloat16, bias=False)
    b = leaves(x)
    loss = FusedLinearDivergence(div, chunk_size=8)(labels=labels, **b)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert b["student_weight"].grad.dtype == torch.bfloat16
    x32 = {k: (t.float() if t is not None else None) for k, t in x.items()}
    ref = dense(div, x32, labels)
    # bf16 logits (8 bits of mantissa) vs fp32 logits of the same bf16 weights
    torch.testing.assert_close(loss, ref, rtol=3e-2, atol=3e-2)


def test_fused_all_masked_and_shape_errors():
    div = ForwardKLLoss()
    x, labels = make(seed=5)
    b = leaves(x)
    loss = FusedLinearDivergence(div)(labels=torch.full_like(labels, -100), **b)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(b["student_weight"].grad == 0)
    bad = dict(x, student_weight=torch.randn(37, 15))
    with pytest.raises(ValueError, match="student output weight"):
        FusedLinearDivergence(div)(labels=labels, **bad)
    with pytest.raises(ValueError, match="chunk_size"):
        FusedLinearDivergence(div, chunk_size=0)
