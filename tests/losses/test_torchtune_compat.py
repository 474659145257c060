"""Loss interoperability with torchtune.

torchtune's KD losses, adapted to our Divergence interface, against torchtune's own classes (the
independent reference); refusals of what is not a divergence; and our divergences as the
``kd_loss`` of torchtune's KD recipe against the divergence modules themselves.
"""

import pytest
import torch
import torchtune.modules.loss as tt
from omegaconf import OmegaConf
from torchtune import config

from distillm_tune.losses import DIVERGENCES, Divergence
from distillm_tune.losses.torchtune_compat import (
    KD_RECIPE_LOSSES,
    TORCHTUNE_KD_LOSSES,
    adapt_loss_config,
)

IGNORE = -100
B, S, V = 3, 8, 13


def _logits(seed, inf=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 2
    t = torch.randn(B, S, V, generator=g, dtype=torch.float64) * 3
    if inf:  # vocabulary entries one side or both forbid (masked logits), never a whole row
        s[0, 1, :3] = float("-inf")
        t[0, 2, 4:6] = float("-inf")
        s[1, 3, 7], t[1, 3, 7] = float("-inf"), float("-inf")
        t[2, 5, 0], s[2, 6, 12] = float("-inf"), float("-inf")
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[0, :2] = IGNORE
    labels[2, 4:] = IGNORE
    return s, t, labels


def _adapted(path, **kwargs):
    cfg, message = adapt_loss_config({"_component_": path, **kwargs})
    loss = config.instantiate(OmegaConf.create(cfg))
    assert isinstance(loss, Divergence) and message and path in message
    return loss


def _torchtune_value(path, kwargs, s, t, labels, chunks):
    """torchtune's own class, called the way torchtune's KD recipe calls it."""
    ref = config.instantiate(OmegaConf.create({"_component_": path, **kwargs}))
    if "Chunked" in path:
        return ref(list(s.chunk(chunks, dim=1)), list(t.chunk(chunks, dim=1)), labels)
    return ref(s.reshape(-1, V), t.reshape(-1, V), labels.reshape(-1))


CASES = [
    ("ForwardKLLoss", {}),
    ("ReverseKLLoss", {}),
    ("SymmetricKLLoss", {}),
    ("SymmetricKLLoss", {"sym_kd_ratio": 0.3}),
    ("ForwardKLWithChunkedOutputLoss", {"num_output_chunks": 4}),
    ("ReverseKLWithChunkedOutputLoss", {"num_output_chunks": 4}),
    ("SymmetricKLWithChunkedOutputLoss", {"num_output_chunks": 2, "sym_kd_ratio": 0.8}),
    ("ReverseKLLoss", {"ignore_index": 5}),
]


def test_every_torchtune_kd_loss_has_a_case():
    public = {n for n in tt.__all__ if n != "CEWithChunkedOutputLoss"}
    assert {"torchtune.modules.loss." + n for n in public} == set(TORCHTUNE_KD_LOSSES)
    assert {n for n, _ in CASES} == public


@pytest.mark.parametrize("name,kwargs", CASES, ids=[f"{n}{k or ''}" for n, k in CASES])
@pytest.mark.parametrize("inf", [False, True], ids=["finite", "masked_vocab"])
def test_adapted_equals_torchtune(name, kwargs, inf):
    path = "torchtune.modules.loss." + name
    s, t, labels = _logits(seed=len(name) + 7 * inf, inf=inf)
    chunks = kwargs.get("num_output_chunks", 1)
    ignore = kwargs.get("ignore_index", IGNORE)
    if ignore != IGNORE:
        labels[labels == 5] = 5  # token id 5 is what this loss ignores
        labels[1, :3] = 5
    ours = _adapted(path, **kwargs)

    s_ref = s.clone().requires_grad_(True)
    expected = _torchtune_value(path, kwargs, s_ref, t, labels, chunks)
    s_ours = s.clone().requires_grad_(True)
    value = ours(s_ours, t, labels)  # whole tensors
    chunked = ours(list(s.chunk(4, dim=1)), t, labels)  # any chunking, as the recipe may use
    # torchtune computes in float32 whatever the input dtype; ours in float64 here
    torch.testing.assert_close(value, expected.double(), rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(chunked, value, rtol=1e-12, atol=1e-12)

    expected.backward()
    value.backward()
    if torch.isfinite(s_ref.grad).all():
        torch.testing.assert_close(s_ours.grad, s_ref.grad.double(), rtol=1e-5, atol=1e-6)
    else:
        # torchtune's reverse KL backpropagates 0 * -inf = NaN where only the teacher forbids a
        # token; ours gives those entries no gradient and stays finite
        assert inf and "ForwardKL" not in name and torch.isfinite(s_ours.grad).all()


def test_forward_kl_differs_from_true_kl_by_the_teacher_entropy():
    """What torchtune calls forward KL is the soft cross-entropy: KL + H(p), float64 reference."""
    from distillm_tune.losses import ForwardKLLoss

    s, t, labels = _logits(seed=3)
    keep = labels != IGNORE
    p = torch.softmax(t[keep], -1)
    entropy = -(p * torch.log(p)).sum(-1).mean()
    tt_value = _adapted("torchtune.modules.loss.ForwardKLLoss")(s, t, labels)
    torch.testing.assert_close(tt_value - ForwardKLLoss()(s, t, labels), entropy, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["ForwardKLLoss", "ReverseKLLoss", "SymmetricKLLoss"])
def test_all_masked_batch_is_zero_like_torchtune(name):
    path = "torchtune.modules.loss." + name
    s, t, labels = _logits(seed=11)
    labels.fill_(IGNORE)
    s.requires_grad_(True)
    value = _adapted(path)(s, t, labels)
    assert value.item() == _torchtune_value(path, {}, s, t, labels, 1).item() == 0.0
    value.backward()
    assert torch.count_nonzero(s.grad) == 0


# -------------------------------------------------------------------------------- refusals


def test_cross_entropy_is_refused_with_the_reason():
    with pytest.raises(ValueError) as e:
        adapt_loss_config({"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss"})
    msg = str(e.value)
    assert msg.startswith("config loss._component_: torchtune.modules.loss.CEWithChunkedOutputLoss")
    assert "CEWithChunkedOutputLoss" in msg.split("(")[1]  # the class itself
    assert "cross-entropy is kd_ratio's other term" in msg


@pytest.mark.parametrize("path,expected", [
    ("torch.nn.KLDivLoss", r"torch.nn.KLDivLoss \(torch.nn.modules.loss.KLDivLoss, a class\) is not a teacher-student divergence"),
    ("torchtune.modules.loss.NoSuchLoss", r"'torchtune.modules.loss.NoSuchLoss' cannot be imported"),
])
def test_other_components_are_refused(path, expected):
    with pytest.raises(ValueError, match=r"^config loss._component_: " + expected):
        adapt_loss_config({"_component_": path})


def test_argument_torchtune_does_not_take_is_refused():
    with pytest.raises(ValueError, match=r"^config loss.temperature: temperature=2.0 is not an argument of "
                                         r"torchtune.modules.loss.ForwardKLLoss \(it takes \['ignore_index'\]\)"):
        adapt_loss_config({"_component_": "torchtune.modules.loss.ForwardKLLoss", "temperature": 2.0})


def test_the_defining_module_path_is_adapted_alike():
    cfg, message = adapt_loss_config({"_component_": "torchtune.modules.loss.kd_losses.SymmetricKLLoss",
                                      "sym_kd_ratio": 0.2})
    assert cfg == {"_component_": "distillm_tune.losses.torchtune_compat.TorchtuneSymmetricKLLoss",
                   "sym_kd_ratio": 0.2}
    assert "adapted to distillm_tune.losses.torchtune_compat.TorchtuneSymmetricKLLoss" in message


def test_our_divergences_pass_unchanged():
    cfg = {"_component_": "distillm_tune.losses.SkewReverseKLLoss", "alpha": 0.2}
    assert adapt_loss_config(cfg) == (cfg, None)


# ------------------------------------------------- our divergences as torchtune's kd_loss


KWARGS = {"skl": {"alpha": 0.2}, "srkl": {"alpha": 0.3}, "jsd": {"beta": 0.7}, "iskl": {"alpha": 0.2, "beta": 0.4}}


def test_a_kd_recipe_loss_for_every_divergence():
    assert set(KD_RECIPE_LOSSES) == set(DIVERGENCES)
    for name, cls in KD_RECIPE_LOSSES.items():
        assert cls.divergence_cls is DIVERGENCES[name]


@pytest.mark.parametrize("name", sorted(DIVERGENCES))
def test_kd_recipe_loss_equals_the_divergence(name):
    """Called as torchtune's recipe calls kd_loss: chunk lists and [B, S] labels with
    CEWithChunkedOutputLoss, flat [N, V] logits and [N] labels otherwise."""
    kwargs = {**KWARGS.get(name, {}), "temperature": 1.5}
    s, t, labels = _logits(seed=5, inf=False)
    wrapper = config.instantiate(OmegaConf.create({
        "_component_": f"distillm_tune.losses.torchtune_compat.{KD_RECIPE_LOSSES[name].__name__}",
        "num_output_chunks": 4, **kwargs}))
    assert wrapper.num_output_chunks == tt.CEWithChunkedOutputLoss(num_output_chunks=4).num_output_chunks
    assert wrapper.ignore_index == IGNORE
    divergence = DIVERGENCES[name](**kwargs)
    expected = divergence(s, t, labels)
    s_chunks = [c.clone().requires_grad_(True) for c in s.chunk(4, dim=1)]
    value = wrapper(s_chunks, list(t.chunk(4, dim=1)), labels)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    flat = wrapper(s.reshape(-1, V), t.reshape(-1, V), labels.reshape(-1))
    torch.testing.assert_close(flat, expected, rtol=1e-12, atol=1e-12)
    value.backward()  # the recipe backpropagates through it
    assert all(c.grad is not None and torch.isfinite(c.grad).all() for c in s_chunks)


@pytest.mark.parametrize("name", ["ForwardKLLoss", "SymmetricKLLoss"])
def test_adapted_loss_on_the_fused_path_equals_torchtune(name):
    """The recipe's fused_loss_chunk_size path wraps the adapted divergence like any other."""
    from distillm_tune.losses import FusedLinearDivergence

    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(B, S, 6, generator=g, dtype=torch.float64), torch.randn(B, S, 9, generator=g, dtype=torch.float64)
    ws, wt = torch.randn(V, 6, generator=g, dtype=torch.float64), torch.randn(V, 9, generator=g, dtype=torch.float64)
    _, _, labels = _logits(seed=4)
    path = "torchtune.modules.loss." + name
    ws_ref, ws_ours = ws.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    expected = _torchtune_value(path, {}, hs @ ws_ref.T, ht @ wt.T, labels, 1)
    value = FusedLinearDivergence(_adapted(path), chunk_size=5)(hs, ws_ours, ht, wt, labels)
    torch.testing.assert_close(value, expected.double(), rtol=2e-6, atol=2e-6)
    expected.backward()
    value.backward()
    torch.testing.assert_close(ws_ours.grad, ws_ref.grad.double(), rtol=1e-5, atol=1e-6)
