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


# ------------------------------------------------ hard + soft term in one pass (kd_ratio < 1)


def _reference64(name, x, labels, kd_ratio, temperature, alpha, vocab):
    """kd_ratio·D + (1−kd_ratio)·CE summed over the counted tokens, D and CE, written out in
    float64 from the logits: D over the first ``vocab`` logits at temperature T, CE over all the
    student's logits (its padded rows too) at T = 1."""
    d = {k: (t.double() if t is not None else None) for k, t in x.items()}
    s = F.linear(d["student_hidden"], d["student_weight"], d["student_bias"])
    t = F.linear(d["teacher_hidden"], d["teacher_weight"], d["teacher_bias"])
    keep = labels != -100
    s, t, lab = s[keep], t[keep], labels[keep]
    log_q = torch.log_softmax(s[:, :vocab] / temperature, -1)
    log_p = torch.log_softmax(t[:, :vocab] / temperature, -1)
    q, p = log_q.exp(), log_p.exp()
    if name == "fkl":
        div = (p * (log_p - log_q)).sum()
    elif name == "rkl":
        div = (q * (log_q - log_p)).sum()
    else:  # srkl: KL(q ‖ (1 − α) p + α q)
        div = (q * (log_q - torch.log((1 - alpha) * p + alpha * q))).sum()
    ce = -torch.log_softmax(s, -1).gather(1, lab[:, None]).sum()
    return kd_ratio * div + (1 - kd_ratio) * ce, div, ce


@pytest.mark.parametrize("name, div", [
    ("fkl", ForwardKLLoss(temperature=1.5, vocab_size=37)),
    ("rkl", ReverseKLLoss(vocab_size=37)),
    ("srkl", SkewReverseKLLoss(alpha=0.1, vocab_size=37)),
], ids=["fkl-T1.5", "rkl", "srkl"])
@pytest.mark.parametrize("kd_ratio", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("chunk_size", [5, 1024])
def test_fused_hard_and_soft_terms_equal_the_float64_formula(name, div, kd_ratio, chunk_size):
    """One chunked pass gives kd_ratio·D + (1−kd_ratio)·CE with its gradients (autograd of the
    float64 formula), and D and CE themselves (without gradient, for logging); padded embedding
    rows (student 40, teacher 43, shared 37) take part in the CE only."""
    x, labels = make(v=40, v_teacher=43, seed=6)
    labels[2, 3] = 39  # a label in the student's padded rows: CE only
    a, b = leaves(x), leaves(x)
    a64 = {k: (t.detach().double().requires_grad_(t.requires_grad) if t is not None else None) for k, t in a.items()}
    ref, ref_div, ref_ce = _reference64(name, a64, labels, kd_ratio, div.temperature, getattr(div, "alpha", 0.0), 37)
    ref.backward()
    loss, got_div, got_ce, count = FusedLinearDivergence(div, chunk_size=chunk_size).loss_sums(
        labels=labels, kd_ratio=kd_ratio, **b)
    assert not got_div.requires_grad and not got_ce.requires_grad and loss.requires_grad
    assert int(count) == int((labels != -100).sum())
    torch.testing.assert_close(got_div.double(), ref_div.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_ce.double(), ref_ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    loss.backward()
    for k in ("student_hidden", "student_weight", "student_bias"):
        torch.testing.assert_close(b[k].grad.double(), a64[k].grad, rtol=1e-4, atol=1e-5, msg=k)
    if kd_ratio == 1.0:  # the divergence alone: padded rows get nothing
        assert torch.all(b["student_weight"].grad[37:] == 0)
    else:
        assert b["student_weight"].grad[37:].abs().sum() > 0


def test_fused_hard_and_soft_terms_finite_differences_float64():
    div = SkewReverseKLLoss(alpha=0.3, temperature=2.0)
    x, labels = make(b=2, s=3, hs=4, ht=5, v=7, seed=7, dtype=torch.float64)
    fused = FusedLinearDivergence(div, chunk_size=2)

    def f(h, w, bias):
        return fused.loss_sums(h, w, x["teacher_hidden"], x["teacher_weight"], labels, bias, x["teacher_bias"],
                               kd_ratio=0.4)[0]

    inputs = tuple(x[k].clone().requires_grad_(True) for k in ("student_hidden", "student_weight", "student_bias"))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_fused_kd_ratio_one_keeps_the_divergence_when_the_cross_entropy_is_infinite():
    """kd_ratio = 1 is the divergence, not D + 0·CE: a label the student gives probability 0 (CE
    inf, logged as such) leaves the loss and its gradient finite."""
    div = ForwardKLLoss()
    x, labels = make(bias=True, seed=8)
    x["student_bias"][labels[2, 0]] = float("-inf")
    b = leaves(x)
    loss, _, ce, _ = FusedLinearDivergence(div, chunk_size=4).loss_sums(labels=labels, **b)
    assert torch.isinf(ce) and torch.isfinite(loss)
    with pytest.raises(ValueError, match="kd_ratio"):
        FusedLinearDivergence(div).loss_sums(labels=labels, kd_ratio=1.5, **x)
