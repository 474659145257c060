"""torchtune's KD losses as kd_offpolicy's ``loss._component_``: adapted at setup, trained the same
as our own divergences, and anything that is not a divergence refused before a model loads."""

import logging

import pytest
import torch

from conftest import assert_same_weights, run_recipe

TT = "loss._component_=torchtune.modules.loss."
OURS = "loss._component_=distillm_tune.losses."
SAME = ("loss", "loss_div", "loss_ce", "grad_norm")


def test_torchtune_reverse_kl_trains_exactly_as_ours(tiny_assets, tmp_path, one_thread, caplog):
    with caplog.at_level(logging.INFO):
        _, rows_tt = run_recipe(tiny_assets, str(tmp_path / "tt"), "method=kd", TT + "ReverseKLWithChunkedOutputLoss",
                                "loss.num_output_chunks=4")
    assert any("loss._component_=torchtune.modules.loss.ReverseKLWithChunkedOutputLoss: adapted to "
               "distillm_tune.losses.divergences.ReverseKLLoss" in r.getMessage() and
               "num_output_chunks=4 not used" in r.getMessage() for r in caplog.records)
    _, rows_ours = run_recipe(tiny_assets, str(tmp_path / "ours"), "method=kd", OURS + "ReverseKLLoss")
    assert [r["step"] for r in rows_tt] == [r["step"] for r in rows_ours] == [1, 2, 3]
    for a, b in zip(rows_tt, rows_ours):
        assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}, a["step"]
    assert_same_weights(str(tmp_path / "tt"), str(tmp_path / "ours"), rtol=0, atol=0)


def test_torchtune_forward_kl_trains_as_ours_and_logs_torchtunes_value(tiny_assets, tmp_path, one_thread):
    """torchtune's ForwardKLLoss is −Σ p log q = KL(p ‖ q) + H(p): the same gradients as our
    ForwardKLLoss step for step, and a logged divergence larger by the teacher's entropy on that
    step's batch, recomputed here in float64 from the teacher and the batches."""
    recipe, rows_tt = run_recipe(tiny_assets, str(tmp_path / "tt"), "method=kd", TT + "ForwardKLLoss")
    _, rows_ours = run_recipe(tiny_assets, str(tmp_path / "ours"), "method=kd", OURS + "ForwardKLLoss")
    assert len(rows_tt) == len(rows_ours) == 3
    order = recipe._epoch_order(0)
    for i, (a, b) in enumerate(zip(rows_tt, rows_ours)):
        for k in ("loss_ce", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-6), (a["step"], k)
        batch = recipe.io.collate(recipe._dataset_samples(order, i))
        with torch.no_grad():
            t_logits = recipe.io.forward(recipe.teacher, batch, recipe.device)  # chunks along S
        t_logits = torch.cat(list(t_logits), dim=1).double()
        keep = batch["labels"] != -100
        log_p = torch.log_softmax(t_logits[keep], -1)
        entropy = -(log_p.exp() * log_p).sum(-1).mean().item()
        assert entropy > 0.1
        assert a["loss_div"] - b["loss_div"] == pytest.approx(entropy, rel=1e-5), a["step"]
    assert_same_weights(str(tmp_path / "tt"), str(tmp_path / "ours"), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("component,key,reason", [
    ("torchtune.modules.loss.CEWithChunkedOutputLoss", "loss._component_",
     "is not a teacher-student divergence: cross-entropy is kd_ratio's other term"),
    ("torch.nn.KLDivLoss", "loss._component_", "is not a teacher-student divergence"),
    ("torchtune.modules.loss.SymmetricKLLoss", "loss.alpha", "SymmetricKLLoss takes no argument 'alpha'"),
    # a factory, not a class: what it builds is checked once built, still before any model
    ("torch.get_default_dtype", "loss._component_", "built a dtype, not a distillm_tune.losses.Divergence"),
])
def test_refused_before_any_model_loads(tiny_assets, tmp_path, monkeypatch, component, key, reason):
    from distillm_tune.recipes import kd_offpolicy

    loads = []
    for name in ("load_hf", "load_hf_tokenizer"):
        real = getattr(kd_offpolicy, name)
        monkeypatch.setattr(kd_offpolicy, name, lambda *a, _real=real, **k: loads.append(a) or _real(*a, **k))
    extra = ["loss.alpha=0.1"] if key == "loss.alpha" else []
    with pytest.raises(ValueError) as e:
        run_recipe(tiny_assets, str(tmp_path), "method=kd", f"loss._component_={component}", *extra)
    msg = str(e.value)
    assert msg.startswith(f"config {key}: ") and component in msg and reason in msg, msg
    assert loads == []
