"""DistiLLM-2's contrastive loss (DISTILLM2_SPEC §5.3, tests 1-9 and 12) against independent
float64 references: the definitions with probabilities, a transcription of the released trainer's
loss (as the spec describes it, `T:1128-1242`, `T:1073-1078`: both divergences on all 2B rows in
log space, split at B, token mean, (2 − b)·chosen + b·rejected), finite differences and the closed
forms of §2.1."""

import math

import pytest
import torch

from distillm_tune.losses import DistiLLM2Loss, SkewForwardKLLoss, SkewReverseKLLoss
from distillm_tune.losses.contrastive import adaptive_alpha, gradual_beta_b, sequence_mean_logprob

IGNORE = -100


# ------------------------------------------------------------------------------ references


def _kl64(a, b):
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def skl_definition(s, t, alpha):
    q, p = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    return _kl64(p, alpha * p + (1 - alpha) * q)


def srkl_definition(s, t, alpha):
    q, p = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    return _kl64(q, (1 - alpha) * p + alpha * q)


def official_token_terms(student_logits, teacher_logits, alpha_t, alpha_s):
    """Per-token SKL and SRKL on every row, as the released trainer computes them: log-softmax,
    log-space mixtures by logsumexp, the student's log-probs detached inside the SRKL mixture.
    ``alpha_*``: a number or one value per row."""
    logq = torch.log_softmax(student_logits, -1)
    logp = torch.log_softmax(teacher_logits, -1)

    def per_row(a):
        a = torch.as_tensor(a, dtype=logq.dtype)
        return a.reshape(-1, 1, 1) if a.dim() else a

    at, as_ = per_row(alpha_t), per_row(alpha_s)
    mix_t = torch.logsumexp(torch.stack([torch.log(at) + logp, torch.log(1 - at) + logq]), 0)
    skl = (logp.exp() * (logp - mix_t)).sum(-1)
    mix_s = torch.logsumexp(torch.stack([torch.log(1 - as_) + logp, torch.log(as_) + logq.detach()]), 0)
    srkl = (logq.exp() * (logq - mix_s)).sum(-1)
    return skl, srkl


def official_loss(student_logits, teacher_logits, labels, b=1.0, alpha_t=0.1, alpha_s=0.1):
    """The released loss in float64: token mean per row over labels != -100, split at B."""
    B = labels.shape[0] // 2
    s, t = student_logits.double(), teacher_logits.double()
    at = alpha_t if not torch.is_tensor(alpha_t) else torch.cat([alpha_t.double(), alpha_t.double()])
    as_ = alpha_s if not torch.is_tensor(alpha_s) else torch.cat([alpha_s.double(), alpha_s.double()])
    skl, srkl = official_token_terms(s, t, at, as_)
    mask = (labels != IGNORE).double()
    skl_seq = (skl * mask).sum(-1) / mask.sum(-1)
    srkl_seq = (srkl * mask).sum(-1) / mask.sum(-1)
    chosen, rejected = skl_seq[:B], srkl_seq[B:]
    return ((2 - b) * chosen + b * rejected).mean(), chosen, rejected


def paper_eq2(student_logits, teacher_logits, labels, beta):
    """Eq. 2 with the code's token mean: 1/(2B) Σ_i [(1−β) D_SKL + β D_SRKL]."""
    _, chosen, rejected = official_loss(student_logits, teacher_logits, labels)
    B = labels.shape[0] // 2
    return ((1 - beta) * chosen + beta * rejected).sum() / (2 * B)


def make_pairs(B=3, S=9, V=23, seed=0, scale=3.0, dtype=torch.float32):
    """2B rows of logits and labels: random prompt lengths (-100), random response lengths, padding."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(2 * B, S, V, generator=g) * scale).to(dtype)
    t = (torch.randn(2 * B, S, V, generator=g) * scale).to(dtype)
    labels = torch.full((2 * B, S), IGNORE)
    for i in range(2 * B):
        start = int(torch.randint(0, 3, (1,), generator=g))
        stop = int(torch.randint(start + 1, S + 1, (1,), generator=g))
        labels[i, start:stop] = torch.randint(0, V, (stop - start,), generator=g)
    return s, t, labels


def skl_closed_form(s, t, alpha):
    """§2.1: dL/dz_k = −(1−α)[p_k q_k/m_k − q_k Σ_v p_v q_v/m_v], m = αp + (1−α)q."""
    q, p = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    m = alpha * p + (1 - alpha) * q
    r = p * q / m
    return -(1 - alpha) * (r - q * r.sum(-1, keepdim=True))


def srkl_sg_closed_form(s, t, alpha):
    """§2.1: dL/dz_k = q_k (g_k − Σ_v q_v g_v), g = log q − log m, m held fixed."""
    q, p = torch.softmax(s.double(), -1), torch.softmax(t.double(), -1)
    g = torch.log(q) - torch.log((1 - alpha) * p + alpha * q)
    return q * (g - (q * g).sum(-1, keepdim=True))


def _all_labelled(n, v):
    return torch.zeros(n, 1, dtype=torch.long).expand(n, 1).clone()


def token_values(loss, s_rows, t_rows, alpha=None):
    """Per-token values of a skew loss on [N, V] rows, through the row-sum API (one token per row)."""
    labels = torch.zeros(s_rows.shape[0], 1, dtype=torch.long)
    sums, counts = loss.row_sums_and_counts(s_rows[:, None], t_rows[:, None], labels, alpha)
    assert counts.tolist() == [1] * s_rows.shape[0]
    return sums


# --------------------------------------------------------------- 1. token values (SKL, SRKL)


@pytest.mark.parametrize("V", [50, 151_936])
@pytest.mark.parametrize("scale", [1.0, 30.0])
@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5])
def test_token_values_match_the_definition_and_the_official_transcription(V, scale, alpha):
    g = torch.Generator().manual_seed(V + int(scale) + int(alpha * 100))
    N = 3 if V > 1000 else 16
    s = torch.randn(N, V, generator=g) * scale
    t = torch.randn(N, V, generator=g) * scale
    skl = token_values(SkewForwardKLLoss(alpha=alpha), s, t)
    srkl = token_values(SkewReverseKLLoss(alpha=alpha, stop_grad_mixture=True), s, t)
    off_skl, off_srkl = official_token_terms(s.double(), t.double(), alpha, alpha)
    for ours, definition, official in ((skl, skl_definition(s, t, alpha), off_skl),
                                       (srkl, srkl_definition(s, t, alpha), off_srkl)):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours.double(), definition, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(definition, official, rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------- 2-3. gradients (float64)


def _autograd(loss, s, t, alpha=None):
    s = s.clone().requires_grad_(True)
    token_values(loss, s, t, alpha).sum().backward()
    return s.grad


def _finite_differences(fn, s, eps=1e-6):
    grad = torch.zeros_like(s)
    for idx in range(s.numel()):
        d = torch.zeros_like(s).view(-1)
        d[idx] = eps
        d = d.view_as(s)
        grad.view(-1)[idx] = (fn(s + d) - fn(s - d)) / (2 * eps)
    return grad


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5])
def test_skl_gradient_equals_the_closed_form_and_finite_differences(alpha):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 7, generator=g, dtype=torch.float64) * 2, torch.randn(4, 7, generator=g, dtype=torch.float64) * 2
    ours = _autograd(SkewForwardKLLoss(alpha=alpha), s, t)
    torch.testing.assert_close(ours, skl_closed_form(s, t, alpha), rtol=0, atol=1e-8)
    fd = _finite_differences(lambda z: skl_definition(z, t, alpha).sum(), s)
    torch.testing.assert_close(ours, fd, rtol=0, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.01, 0.1, 0.5])
def test_srkl_stop_gradient_equals_its_closed_form_and_finite_differences_with_the_mixture_fixed(alpha):
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 7, generator=g, dtype=torch.float64) * 2, torch.randn(4, 7, generator=g, dtype=torch.float64) * 2
    ours = _autograd(SkewReverseKLLoss(alpha=alpha, stop_grad_mixture=True), s, t)
    torch.testing.assert_close(ours, srkl_sg_closed_form(s, t, alpha), rtol=0, atol=1e-8)
    q0, p = torch.softmax(s, -1), torch.softmax(t, -1)
    m_fixed = (1 - alpha) * p + alpha * q0  # the student's copy in the mixture stays at s

    def value(z):
        return _kl64(torch.softmax(z, -1), m_fixed).sum()

    torch.testing.assert_close(ours, _finite_differences(value, s), rtol=0, atol=1e-7)
    # the official transcription's autograd (logq.detach() in the mixture) agrees
    s_req = s.clone().requires_grad_(True)
    official_token_terms(s_req, t, alpha, alpha)[1].sum().backward()
    torch.testing.assert_close(ours, s_req.grad, rtol=0, atol=1e-10)


def test_srkl_stop_gradient_differs_from_the_distillm1_gradient():
    """The guard: without the stop-gradient (DistiLLM-1's SRKL) the gradient is another one."""
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(1, 7, generator=g, dtype=torch.float64) * 2, torch.randn(1, 7, generator=g, dtype=torch.float64) * 2
    sg = _autograd(SkewReverseKLLoss(alpha=0.1, stop_grad_mixture=True), s, t)
    plain = _autograd(SkewReverseKLLoss(alpha=0.1), s, t)
    fd_full = _finite_differences(lambda z: srkl_definition(z, t, 0.1).sum(), s)
    torch.testing.assert_close(plain, fd_full, rtol=0, atol=1e-7)  # the default stays DistiLLM-1's
    assert (sg - plain).abs().max() > 1e-3
    # same value either way
    torch.testing.assert_close(token_values(SkewReverseKLLoss(alpha=0.1, stop_grad_mixture=True), s, t),
                               token_values(SkewReverseKLLoss(alpha=0.1), s, t), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------- 4. limits


def test_limits():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, 11, generator=g, dtype=torch.float64), torch.randn(5, 11, generator=g, dtype=torch.float64)
    q, p = torch.softmax(s, -1), torch.softmax(t, -1)
    tiny = torch.full((5,), 1e-12, dtype=torch.float64)
    torch.testing.assert_close(token_values(SkewForwardKLLoss(), s, t, tiny), _kl64(p, q), rtol=1e-9, atol=1e-10)
    srkl = SkewReverseKLLoss(stop_grad_mixture=True)
    torch.testing.assert_close(token_values(srkl, s, t, tiny), _kl64(q, p), rtol=1e-9, atol=1e-10)
    for loss in (SkewForwardKLLoss(), srkl):
        assert token_values(loss, s, s).abs().max() < 1e-12  # p = q
        nearly_one = torch.full((5,), 1 - 1e-12, dtype=torch.float64)
        assert token_values(loss, s, t, nearly_one).abs().max() < 1e-9  # α -> 1
        big = torch.randn(200, 11, generator=g, dtype=torch.float64) * 10
        assert (token_values(loss, big, torch.randn(200, 11, generator=g, dtype=torch.float64) * 10) >= -1e-12).all()


def test_skl_is_distillm1_skewed_forward_kl_plus_the_teacher_entropy_term_with_the_same_gradient():
    """DistiLLM-1's skewed_forward_kl = −Σ p log m (the Σ p log p term dropped), transcribed."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 13, generator=g, dtype=torch.float64), torch.randn(6, 13, generator=g, dtype=torch.float64)

    def distillm1(z):
        p, q = torch.softmax(t, -1), torch.softmax(z, -1)
        return -(p * torch.log(0.1 * p + 0.9 * q)).sum(-1)

    p = torch.softmax(t, -1)
    ours = token_values(SkewForwardKLLoss(alpha=0.1), s, t)
    torch.testing.assert_close(ours, distillm1(s) + (p * torch.log(p)).sum(-1), rtol=0, atol=1e-12)
    z = s.clone().requires_grad_(True)
    distillm1(z).sum().backward()
    torch.testing.assert_close(_autograd(SkewForwardKLLoss(alpha=0.1), s, t), z.grad, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- 5-6. masking, pairing


def _loss_and_grad(loss, s, t, labels, **kw):
    s = s.clone().requires_grad_(True)
    value = loss(s, t, labels, **kw)
    value.backward()
    return value.detach(), s.grad


@pytest.mark.parametrize("b", [1.0, 1.25, 1.5])
def test_loss_equals_the_official_transcription_with_random_lengths(b):
    s, t, labels = make_pairs(seed=6)
    ours = DistiLLM2Loss(alpha=0.1)(s, t, labels, b=b)
    official, _, _ = official_loss(s, t, labels, b=b)
    assert abs(float(ours) - float(official)) < 1e-6
    # and with float64 inputs, the gradients too
    s64 = s.double().requires_grad_(True)
    DistiLLM2Loss(alpha=0.1)(s64, t.double(), labels, b=b).backward()
    ref = s.double().requires_grad_(True)
    official_loss(ref, t, labels, b=b)[0].backward()
    torch.testing.assert_close(s64.grad, ref.grad, rtol=0, atol=1e-10)


def test_loss_is_the_pair_mean_of_the_weighted_row_means_and_4x_the_papers_eq2():
    s, t, labels = make_pairs(B=4, seed=7)
    B = 4
    terms = DistiLLM2Loss(alpha=0.1).pair_losses(s, t, labels, b=1.3)
    for i in range(B):  # row by row from the definitions
        for key, rows, fn in (("skl", i, skl_definition), ("srkl", B + i, srkl_definition)):
            keep = labels[rows] != IGNORE
            expected = fn(s[rows][keep], t[rows][keep], 0.1).mean()
            assert float(terms[key][i]) == pytest.approx(float(expected), rel=1e-5)
    expected = ((2 - 1.3) * terms["skl"] + 1.3 * terms["srkl"]).mean()
    assert float(DistiLLM2Loss(alpha=0.1)(s, t, labels, b=1.3)) == pytest.approx(float(expected), rel=1e-6)
    plain = DistiLLM2Loss(alpha=0.1)(s, t, labels)  # b = 1, β = 0.5
    assert float(plain) == pytest.approx(4 * float(paper_eq2(s, t, labels, beta=0.5)), rel=1e-6)
    # swapping the teacher and the student rows is another loss
    swapped = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)])
    assert abs(float(DistiLLM2Loss()(s[swapped], t[swapped], labels[swapped])) - float(plain)) > 1e-3


def test_prompt_pad_and_unlabelled_positions_do_not_matter_and_padding_does_not_change_the_loss():
    s, t, labels = make_pairs(seed=8)
    loss = DistiLLM2Loss()
    base, grad = _loss_and_grad(loss, s, t, labels)
    masked = labels == IGNORE
    g = torch.Generator().manual_seed(9)
    s2 = torch.where(masked[..., None], torch.randn(s.shape, generator=g) * 50, s)
    t2 = torch.where(masked[..., None], torch.randn(t.shape, generator=g) * 50, t)
    value2, grad2 = _loss_and_grad(loss, s2, t2, labels)
    assert float(value2) == pytest.approx(float(base), rel=1e-6)
    torch.testing.assert_close(grad2[~masked], grad[~masked], rtol=1e-5, atol=1e-7)
    assert (grad2[masked] == 0).all()
    # appending padding columns (token mean per row)
    pad = 5
    s3 = torch.cat([s, torch.randn(s.shape[0], pad, s.shape[2], generator=g)], 1)
    t3 = torch.cat([t, torch.randn(t.shape[0], pad, t.shape[2], generator=g)], 1)
    l3 = torch.cat([labels, torch.full((labels.shape[0], pad), IGNORE)], 1)
    assert float(loss(s3, t3, l3)) == pytest.approx(float(base), rel=1e-6)


# ---------------------------------------------------------------------------- 7. β schedule


def test_gradual_beta():
    assert [gradual_beta_b(k, 100) for k in (0, 25, 50, 100)] == [1.0, 1.25, 1.5, 1.5]
    assert gradual_beta_b(10, 40) == pytest.approx(1.0 + 0.5 * min(1, 2 * 10 / 40))
    with pytest.raises(ValueError, match="steps >= 1"):
        gradual_beta_b(0, 0)


# -------------------------------------------------------------------------- 8. α curriculum


def _clip_formula(gap, m, alpha0=0.1, alpha_min=0.01):
    return min(max(1 - (1 - alpha0) * m / (gap + 1e-5), alpha_min), alpha0)


@pytest.mark.parametrize("p_bar, q_bar, m", [
    (0.60, 0.10, 0.52),   # inside the bounds: 1 − 0.9·0.52/0.50001 ≈ 0.064
    (0.60, 0.10, 0.54),   # inside, near α_min: ≈ 0.028
    (0.60, 0.10, 0.70),   # gap well below the anchor ("easy"): clipped to α_min
    (0.90, 0.10, 0.70),   # gap above the anchor ("hard"): clipped to α0
    (0.10, 0.60, 0.20),   # opposite sign to the anchor: α0
    (0.30, 0.30, 0.20),   # gap -> 0: 1 − 0.9·0.2/1e-5 < 0.01, clipped to α_min
])
def test_adaptive_alpha_hand_cases(p_bar, q_bar, m):
    gap = torch.tensor([p_bar - q_bar])
    got = float(adaptive_alpha(gap, m, 0.1, 0.01))
    assert got == pytest.approx(_clip_formula(p_bar - q_bar, m), abs=1e-7)
    assert 0.01 - 1e-7 <= got <= 0.1 + 1e-7


def test_adaptive_alpha_values_and_no_gradient():
    assert float(adaptive_alpha(torch.tensor([0.5]), 0.52, 0.1, 0.01)) == pytest.approx(1 - 0.9 * 0.52 / 0.50001, rel=1e-6)
    assert 0.01 < float(adaptive_alpha(torch.tensor([0.5]), 0.52, 0.1, 0.01)) < 0.1
    assert float(adaptive_alpha(torch.tensor([-0.3]), 0.2, 0.1, 0.01)) == pytest.approx(0.1)
    assert float(adaptive_alpha(torch.tensor([0.0]), 0.2, 0.1, 0.01)) == pytest.approx(0.01)
    assert float(adaptive_alpha(torch.tensor([float("nan")]), 0.2, 0.1, 0.01)) == pytest.approx(0.1)
    gap = torch.tensor([0.4, 0.9], requires_grad=True)
    assert not adaptive_alpha(gap * 2, 0.3, 0.1, 0.01).requires_grad


def test_sequence_mean_logprob_is_the_log_geometric_mean_token_probability():
    s, _, labels = make_pairs(seed=10)
    ours = sequence_mean_logprob(s, labels)
    logp = torch.log_softmax(s.double(), -1)
    for i in range(labels.shape[0]):
        keep = labels[i] != IGNORE
        expected = logp[i][keep].gather(-1, labels[i][keep][:, None]).mean()
        assert float(ours[i]) == pytest.approx(float(expected), rel=1e-5)
    chunks = list(s.split([4, 5], dim=1))
    torch.testing.assert_close(sequence_mean_logprob(chunks, labels), ours)


def test_per_sequence_alpha_is_used_row_by_row():
    s, t, labels = make_pairs(B=3, seed=11)
    at, as_ = torch.tensor([0.01, 0.05, 0.1]), torch.tensor([0.1, 0.02, 0.07])
    ours = DistiLLM2Loss(alpha=0.1)(s, t, labels, b=1.2, alpha_t=at, alpha_s=as_)
    official, _, _ = official_loss(s, t, labels, b=1.2, alpha_t=at, alpha_s=as_)
    assert abs(float(ours) - float(official)) < 1e-6
    with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\)"):
        DistiLLM2Loss()(s, t, labels, alpha_t=torch.tensor([0.1, 1.0, 0.1]))


# --------------------------------------------------------------------------- 9. robustness


def test_neg_inf_logits_give_finite_values_and_gradients():
    s, t, labels = make_pairs(seed=12)
    s[..., 3] = float("-inf")
    t[..., 5] = float("-inf")
    t[..., 6] = float("-inf")
    s[..., 6] = float("-inf")
    value, grad = _loss_and_grad(DistiLLM2Loss(), s, t, labels)
    assert math.isfinite(float(value)) and torch.isfinite(grad).all()
    # the definition with 0·log 0 := 0
    B = labels.shape[0] // 2
    expected = []
    for i in range(B):
        ks, kr = labels[i] != IGNORE, labels[B + i] != IGNORE
        expected.append(skl_definition(s[i][ks], t[i][ks], 0.1).mean() + srkl_definition(s[B + i][kr], t[B + i][kr], 0.1).mean())
    assert float(value) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)


def test_bf16_inputs_and_a_152k_vocabulary_match_float64():
    s, t, labels = make_pairs(B=1, S=3, V=152_064, seed=13, scale=5.0, dtype=torch.bfloat16)
    labels[:, :] = torch.tensor([[IGNORE, 7, 9], [IGNORE, 11, IGNORE]])
    ours = DistiLLM2Loss()(s, t, labels)
    assert ours.dtype == torch.float32 and math.isfinite(float(ours))
    official, _, _ = official_loss(s.double(), t.double(), labels)
    assert float(ours) == pytest.approx(float(official), rel=1e-5)


def test_chunked_and_dense_logits_agree():
    s, t, labels = make_pairs(seed=14)
    loss = DistiLLM2Loss()
    dense, g_dense = _loss_and_grad(loss, s, t, labels)
    sc = s.clone().requires_grad_(True)
    chunked = loss(list(sc.split([2, 3, 4], dim=1)), list(t.split([2, 3, 4], dim=1)), labels)
    chunked.backward()
    assert float(chunked.detach()) == pytest.approx(float(dense), rel=1e-6)
    torch.testing.assert_close(sc.grad, g_dense)


def test_padded_vocabulary_is_sliced():
    s, t, labels = make_pairs(seed=15, V=20)
    s_pad = torch.cat([s, torch.randn(*s.shape[:2], 4)], -1)
    assert float(DistiLLM2Loss(vocab_size=20)(s_pad, t, labels)) == pytest.approx(float(DistiLLM2Loss()(s, t, labels)), rel=1e-6)


# ------------------------------------------------------------- 12. one step on tiny models


class _TinyLM(torch.nn.Module):
    def __init__(self, V, H, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = torch.nn.Parameter(torch.randn(V, H, generator=g))
        self.mix = torch.nn.Parameter(torch.randn(H, H, generator=g) / H ** 0.5)
        self.out = torch.nn.Parameter(torch.randn(V, H, generator=g) / H ** 0.5)

    def forward(self, tokens):
        h = self.emb[tokens]
        h = torch.tanh(h + torch.cumsum(h, 1) @ self.mix)  # depends on the prefix
        return h @ self.out.t()


def test_one_step_on_tiny_models_equals_the_float64_transcription():
    V, H, B, S = 32, 16, 3, 10
    g = torch.Generator().manual_seed(16)
    tokens = torch.randint(0, V, (2 * B, S), generator=g)
    labels = torch.full((2 * B, S), IGNORE)
    for i in range(2 * B):  # prompt of 3, response of random length, then padding
        n = int(torch.randint(2, S - 3, (1,), generator=g))
        labels[i, 2 : 2 + n] = tokens[i, 3 : 3 + n]
    teacher, student = _TinyLM(V, H, 1), _TinyLM(V, H, 2)
    with torch.no_grad():
        t_logits = teacher(tokens)
    loss = DistiLLM2Loss(alpha=0.1)(student(tokens), t_logits, labels, b=1.25)
    loss.backward()
    ours = torch.cat([p.grad.flatten() for p in student.parameters()])

    student64 = _TinyLM(V, H, 2).double()
    ref, _, _ = official_loss(student64(tokens), teacher.double()(tokens).detach(), labels, b=1.25)
    ref.backward()
    theirs = torch.cat([p.grad.flatten() for p in student64.parameters()])
    assert abs(float(loss.detach()) - float(ref.detach())) < 1e-6
    assert float(torch.nn.functional.cosine_similarity(ours.double(), theirs, dim=0)) > 0.9999
