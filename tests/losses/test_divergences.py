"""Divergences against an independent float64 reference written with probabilities."""

import math

import pytest
import torch

from distillm_tune import losses
from distillm_tune.losses import (
    ForwardKLLoss,
    InterpolatedSkewKLLoss,
    JSDLoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    TVDLoss,
)

IGNORE = -100


# ---------- the reference: the paper's formulas, naively, in float64 -------------------------


def _kl64(a, b):
    # Σ a log(a / b) with 0 log 0 = 0
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def reference_per_token(name, s, t, alpha=0.1, beta=0.5, temperature=1.0):
    q = torch.softmax(s.double() / temperature, -1)
    p = torch.softmax(t.double() / temperature, -1)
    if name == "fkl":
        return _kl64(p, q)
    if name == "rkl":
        return _kl64(q, p)
    if name == "skl":
        return _kl64(p, alpha * p + (1 - alpha) * q)
    if name == "srkl":
        return _kl64(q, (1 - alpha) * p + alpha * q)
    if name == "jsd":
        m = beta * p + (1 - beta) * q
        return beta * _kl64(p, m) + (1 - beta) * _kl64(q, m)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "iskl":
        return beta * _kl64(p, alpha * p + (1 - alpha) * q) + (1 - beta) * _kl64(
            q, (1 - alpha) * p + alpha * q
        )
    raise AssertionError(name)


def reference_loss(name, s, t, labels, **kw):
    keep = labels.reshape(-1) != IGNORE
    per_tok = reference_per_token(name, s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1]), **kw)
    if keep.sum() == 0:
        return per_tok.sum() * 0
    return per_tok[keep].sum() / keep.sum()


CASES = [
    ("fkl", ForwardKLLoss, {}),
    ("rkl", ReverseKLLoss, {}),
    ("skl", SkewForwardKLLoss, {"alpha": 0.1}),
    ("skl", SkewForwardKLLoss, {"alpha": 0.7}),
    ("srkl", SkewReverseKLLoss, {"alpha": 0.1}),
    ("srkl", SkewReverseKLLoss, {"alpha": 0.5}),
    ("jsd", JSDLoss, {"beta": 0.1}),
    ("jsd", JSDLoss, {"beta": 0.9}),
    ("tvd", TVDLoss, {}),
    ("iskl", InterpolatedSkewKLLoss, {"alpha": 0.1, "beta": 0.3}),
]
IDS = [f"{n}-{kw}" for n, _, kw in CASES]


def make_batch(b=3, s=7, v=29, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, s, v, generator=g) * scale).to(dtype)
    teacher = (torch.randn(b, s, v, generator=g) * scale).to(dtype)
    labels = torch.randint(0, v, (b, s), generator=g)
    labels[0, : min(3, s - 1)] = IGNORE  # a prompt
    labels[-1, -2:] = IGNORE  # padding
    return student, teacher, labels


# ---------- values and gradients --------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("name,cls,kw", CASES, ids=IDS)
def test_value_and_gradient_match_float64_reference(name, cls, kw, temperature):
    s, t, labels = make_batch()
    s.requires_grad_(True)
    loss = cls(temperature=temperature, **kw)(s, t, labels)
    loss.backward()
    assert loss.dtype == torch.float32

    s64 = s.detach().double().requires_grad_(True)
    ref = reference_loss(name, s64, t.double(), labels, temperature=temperature, **kw)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name,cls,kw", CASES, ids=IDS)
def test_gradient_matches_finite_differences(name, cls, kw):
    s, t, labels = make_batch(b=2, s=3, v=6, seed=1, scale=1.5)
    s = s.double().requires_grad_(True)
    loss_fn = cls(**kw)
    # float64 inputs stay float64 inside the loss, so finite differences are meaningful.
    assert torch.autograd.gradcheck(lambda x: loss_fn(x, t.double(), labels), (s,), eps=1e-6, atol=1e-6)


def test_alpha_zero_reduces_skew_losses_to_plain_kl():
    s, t, labels = make_batch(seed=2)
    torch.testing.assert_close(SkewForwardKLLoss(alpha=0.0)(s, t, labels), ForwardKLLoss()(s, t, labels))
    torch.testing.assert_close(SkewReverseKLLoss(alpha=0.0)(s, t, labels), ReverseKLLoss()(s, t, labels))


def test_forward_kl_is_torchtune_cross_entropy_minus_teacher_entropy():
    """torchtune's ForwardKLLoss reports −Σ p log q; ours adds back the entropy term H(p)."""
    from torchtune.modules.loss import ForwardKLLoss as TorchtuneFKL

    s, t, labels = make_batch(seed=3)
    ours = ForwardKLLoss()(s, t, labels)
    v = s.shape[-1]
    theirs = TorchtuneFKL()(s.reshape(-1, v), t.reshape(-1, v), labels)
    p = torch.softmax(t.double(), -1)
    entropy = -(torch.xlogy(p, p)).sum(-1).reshape(-1)
    keep = labels.reshape(-1) != IGNORE
    torch.testing.assert_close(ours.double(), theirs.double() - entropy[keep].mean(), rtol=1e-5, atol=1e-6)


# ---------- chunks, masks, accumulation -------------------------------------------------------


@pytest.mark.parametrize("name,cls,kw", CASES, ids=IDS)
def test_chunked_equals_dense(name, cls, kw):
    s, t, labels = make_batch(s=10, seed=4)
    s_dense = s.clone().requires_grad_(True)
    s_chunked = s.clone().requires_grad_(True)
    loss_fn = cls(**kw)
    dense = loss_fn(s_dense, t, labels)
    # torchtune's convention: both sides as lists of chunks along the sequence (uneven here).
    chunked = loss_fn(list(s_chunked.chunk(4, dim=1)), list(t.chunk(4, dim=1)), labels)
    dense.backward()
    chunked.backward()
    torch.testing.assert_close(chunked, dense, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(s_chunked.grad, s_dense.grad, rtol=1e-6, atol=1e-8)
    # a chunked student against a dense teacher is split at the same boundaries
    mixed = loss_fn(list(s.chunk(3, dim=1)), t, labels)
    torch.testing.assert_close(mixed, dense.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,cls,kw", CASES, ids=IDS)
def test_masked_tokens_contribute_nothing(name, cls, kw):
    s, t, labels = make_batch(seed=5)
    masked = labels == IGNORE
    s = s.requires_grad_(True)
    loss = cls(**kw)(s, t, labels)
    loss.backward()
    # garbage (even NaN-free extremes) at masked positions changes nothing
    s2, t2 = s.detach().clone(), t.clone()
    s2[masked] = 1e4
    t2[masked] = -1e4
    torch.testing.assert_close(cls(**kw)(s2, t2, labels), loss.detach())
    assert torch.all(s.grad[masked] == 0)


@pytest.mark.parametrize("name,cls,kw", CASES, ids=IDS)
def test_all_masked_batch_gives_zero_not_nan(name, cls, kw):
    s, t, labels = make_batch(seed=6)
    s.requires_grad_(True)
    loss = cls(**kw)(s, t, torch.full_like(labels, IGNORE))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(s.grad == 0)


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name,cls,kw", CASES, ids=IDS)
def test_nan_or_inf_logits_give_nan_not_a_silent_zero(name, cls, kw, bad, side):
    """A broken model must show as a NaN loss (the recipe's guard stops or skips on it); the
    float64 naive formula is NaN there too. NaN at masked positions stays out of the loss."""
    s, t, labels = make_batch(seed=11)
    keep = labels != IGNORE
    row = keep.nonzero()[0]
    (s if side == "student" else t)[row[0], row[1], 2] = bad
    assert torch.isnan(cls(**kw)(s, t, labels))
    s2, t2 = make_batch(seed=11)[:2]
    masked = (~keep).nonzero()[0]
    (s2 if side == "student" else t2)[masked[0], masked[1], 2] = bad
    assert torch.isfinite(cls(**kw)(s2, t2, labels))


def test_sum_and_count_normalise_over_all_micro_batches():
    """Gradient accumulation: Σ sums / Σ counts over micro-batches equals the loss of the whole step."""
    s, t, labels = make_batch(b=4, seed=7)
    labels[1] = IGNORE  # micro-batches with very different token counts
    loss_fn = SkewReverseKLLoss()
    whole = loss_fn(s, t, labels)
    parts = [loss_fn.sum_and_count(s[i : i + 2], t[i : i + 2], labels[i : i + 2]) for i in (0, 2)]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    torch.testing.assert_close(total, whole)
    naive_mean_of_means = sum(p[0] / p[1] for p in parts) / 2
    assert not torch.allclose(naive_mean_of_means, whole)


# ---------- numerical safety ------------------------------------------------------------------


@pytest.mark.parametrize("name,cls,kw", CASES, ids=IDS)
def test_shared_neg_inf_logits_equal_loss_over_the_remaining_vocab(name, cls, kw):
    s, t, labels = make_batch(seed=8)
    banned = torch.tensor([0, 5, 17])
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[..., banned] = float("-inf")
    t_inf[..., banned] = float("-inf")
    s_inf.requires_grad_(True)
    loss = cls(**kw)(s_inf, t_inf, labels)
    loss.backward()
    keep_cols = [i for i in range(s.shape[-1]) if i not in banned.tolist()]
    ref = reference_loss(name, s[..., keep_cols], t[..., keep_cols], labels, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.isfinite(s_inf.grad).all()
    assert torch.all(s_inf.grad[..., banned] == 0)


@pytest.mark.parametrize("name,cls,kw", CASES, ids=IDS)
def test_one_sided_neg_inf_and_extreme_logits_stay_finite(name, cls, kw):
    s, t, labels = make_batch(seed=9)
    s[..., 3] = float("-inf")  # student bans a token the teacher allows
    t[..., 4] = float("-inf")  # teacher bans a token the student allows
    s[0, 3:5] = torch.where(torch.rand(2, s.shape[-1]) > 0.5, 1e4, -1e4)
    t[1, 3:5] = torch.where(torch.rand(2, s.shape[-1]) > 0.5, 1e4, -1e4)
    s.requires_grad_(True)
    loss = cls(**kw)(s, t, labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name,cls,kw", [c for c in CASES if c[0] in ("skl", "srkl", "jsd", "iskl")])
def test_mixture_does_not_underflow_where_probabilities_do(name, cls, kw):
    """Both p and q of a token ~200 nats below the maximum: fp32 probabilities are 0, the
    mixture built from them would be log(0) and the reference code's loss NaN. In log space the
    value matches the float64 formula (float64 does not underflow here)."""
    v = 6
    s = torch.zeros(1, 2, v)
    t = torch.zeros(1, 2, v)
    s[..., 1:] = torch.tensor([-200.0, -210.0, 3.0, -1.0, -250.0])
    t[..., 1:] = torch.tensor([-205.0, -200.0, 1.0, 2.0, -240.0])
    labels = torch.zeros(1, 2, dtype=torch.long)
    assert torch.softmax(s, -1)[0, 0, 1] == 0 and torch.softmax(t, -1)[0, 0, 1] == 0
    s.requires_grad_(True)
    loss = cls(**kw)(s, t, labels)
    loss.backward()
    ref = reference_loss(name, s.detach(), t, labels, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-7)
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("name,cls,kw", CASES, ids=IDS)
def test_bf16_inputs_are_computed_in_fp32(name, cls, kw):
    s, t, labels = make_batch(seed=10, dtype=torch.bfloat16)
    s.requires_grad_(True)
    loss = cls(**kw)(s, t, labels)
    loss.backward()
    assert loss.dtype == torch.float32
    assert s.grad.dtype == torch.bfloat16 and torch.isfinite(s.grad.float()).all()
    # the same bf16 values, upcast by hand, give the same fp32 loss
    ref = reference_loss(name, s.detach().float(), t.float(), labels, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)


# ---------- bad input ---------------------------------------------------------------------------


def test_vocab_mismatch_is_a_clear_error_naming_both_sizes():
    s, _, labels = make_batch(v=50272)
    t = torch.randn(*s.shape[:-1], 50265)
    with pytest.raises(ValueError, match=r"50272.*50265"):
        ForwardKLLoss()(s, t, labels)


def test_vocab_size_slices_padded_embedding_rows():
    s, t, labels = make_batch(v=29, seed=11)
    s_padded = torch.cat([s, torch.randn(*s.shape[:-1], 3) * 50], -1)  # 32 embedding rows, 29 real
    for cls, kw in ((SkewReverseKLLoss, {}), (JSDLoss, {"beta": 0.1})):
        torch.testing.assert_close(
            cls(vocab_size=29, **kw)(s_padded, t, labels), cls(**kw)(s, t, labels)
        )
    with pytest.raises(ValueError, match="vocab_size=40"):
        ForwardKLLoss(vocab_size=40)(s_padded, t, labels)


@pytest.mark.parametrize("alpha", [-0.1, 1.0, 1.5, float("nan")])
def test_alpha_outside_unit_interval_is_rejected(alpha):
    for cls in (SkewForwardKLLoss, SkewReverseKLLoss, InterpolatedSkewKLLoss):
        with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\)"):
            cls(alpha=alpha)


@pytest.mark.parametrize("beta", [-0.01, 1.01])
def test_beta_outside_unit_interval_is_rejected(beta):
    for cls in (JSDLoss, InterpolatedSkewKLLoss):
        with pytest.raises(ValueError, match=r"beta must lie in \[0, 1\]"):
            cls(beta=beta)


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="temperature"):
        ForwardKLLoss(temperature=0.0)
    with pytest.raises(ValueError, match="unknown divergence 'kld'"):
        losses.get_divergence("kld")
    assert isinstance(losses.get_divergence("SRKL", alpha=0.2), SkewReverseKLLoss)
    s, t, labels = make_batch()
    with pytest.raises(ValueError, match="labels of shape"):
        ForwardKLLoss()(s, t, labels[:, :-1])


def test_usable_as_torchtune_component():
    from omegaconf import OmegaConf
    from torchtune import config

    cfg = OmegaConf.create({"_component_": "distillm_tune.losses.SkewReverseKLLoss", "alpha": 0.2})
    loss = config.instantiate(cfg)
    assert isinstance(loss, SkewReverseKLLoss) and math.isclose(loss.alpha, 0.2)
