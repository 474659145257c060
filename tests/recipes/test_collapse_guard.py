"""The collapse guard (issue #12): a student whose own outputs are degenerate (EOS-only, repetitive)
does not train on them (imitkd, gkd, distillm, distillm2), the count is a metric, the run warns
that the student needs SFT first; and sgo.start_after_steps delays SGO.

The degenerate students are real models: the tiny student with its final layer norm set so that
every position's hidden state is one fixed vector along a token's (tied) embedding, so that token
wins every step (EOS: "EOS-only"; another token: "repetitive"). The reference for what was trained
on is the labels that reached the loss, recorded at the loss call."""

import logging
import os
import shutil

import pytest
import torch

from conftest import make_cfg

IGNORE = -100


def _collapsed_student(tiny_assets, out, token):
    from safetensors.torch import load_file, save_file

    src = os.path.join(tiny_assets, "student")
    shutil.copytree(src, out)
    sd = load_file(os.path.join(src, "model.safetensors"))
    wte = sd["transformer.wte.weight"]
    sd["transformer.ln_f.weight"] = torch.zeros_like(sd["transformer.ln_f.weight"])
    sd["transformer.ln_f.bias"] = 100.0 * wte[token] / wte[token].norm() ** 2  # its logit: 100
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    return str(out)


def _recipe(tiny_assets, out, *overrides):
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    recipe = KDOffPolicyRecipe(make_cfg(tiny_assets, str(out), *overrides))
    recipe.setup()
    return recipe


def _record_loss_labels(recipe, attr):
    """Wrap the loss entry point and keep the labels of every call."""
    seen = []
    original = getattr(recipe.loss_fn, attr)

    def wrapped(student_logits, teacher_logits, labels, *a, **k):
        seen.append(labels.detach().clone())
        return original(student_logits, teacher_logits, labels, *a, **k)

    setattr(recipe.loss_fn, attr, wrapped)
    return seen


def _train(recipe):
    from conftest import read_metrics

    recipe.train()
    recipe.cleanup()
    return read_metrics(recipe.output_dir)


@pytest.mark.parametrize("method", ["imitkd", "gkd", "distillm"])
def test_eos_only_outputs_of_an_untrained_student_are_detected_and_not_trained_on(tiny_assets, tmp_path, caplog, method):
    eos = 0  # the tiny tokenizer's EOS (config.json eos_token_id)
    student = _collapsed_student(tiny_assets, tmp_path / "student", eos)
    extra = {"imitkd": [], "gkd": ["sgo.gkd_sgo_prob=1.0"], "distillm": ["sgo.scheduler.phi0=1.0"]}[method]
    recipe = _recipe(tiny_assets, tmp_path / "out", f"method={method}", f"student.checkpoint_dir={student}",
                     "batch_size=4", *extra)
    assert recipe.tokenizer.eos_id == eos
    seen = _record_loss_labels(recipe, "sum_and_count")
    with caplog.at_level(logging.WARNING):
        rows = _train(recipe)
    sgo_steps = [r for r in rows if r["source_sgo"] == 1.0]
    assert sgo_steps, "no SGO step ran"
    assert all(r["sgo_degenerate"] == 4 for r in sgo_steps)
    # what reached the loss: no SGO row kept a label (each step here is one micro-batch)
    for r, labels in zip(rows, seen):
        if r["source_sgo"] == 1.0:
            assert (labels == IGNORE).all()
        else:
            assert (labels != IGNORE).any()
    if method == "distillm":
        assert len(recipe.buffer) == 0  # nothing degenerate to replay later
    warnings = [m.getMessage() for m in caplog.records if "degenerate" in m.getMessage()]
    assert len(warnings) == 1 and "needs SFT first" in warnings[0]


def test_with_the_guard_off_the_same_outputs_are_trained_on(tiny_assets, tmp_path):
    """The control: guards.degenerate_sgo=keep trains on the EOS-only rows the guard masks."""
    student = _collapsed_student(tiny_assets, tmp_path / "student", 0)
    recipe = _recipe(tiny_assets, tmp_path / "out", "method=imitkd", f"student.checkpoint_dir={student}",
                     "batch_size=4", "guards.degenerate_sgo=keep")
    seen = _record_loss_labels(recipe, "sum_and_count")
    rows = _train(recipe)
    assert all(r["sgo_degenerate"] == 4 for r in rows)
    assert all(int((labels != IGNORE).sum()) == 4 for labels in seen)  # one EOS label per row


def test_repetitive_outputs_are_detected(tiny_assets, tmp_path):
    token = 7
    student = _collapsed_student(tiny_assets, tmp_path / "student", token)
    recipe = _recipe(tiny_assets, tmp_path / "out", "method=gkd", "sgo.gkd_sgo_prob=1.0",
                     f"student.checkpoint_dir={student}", "batch_size=4")
    generated = []
    original = recipe._generate

    def generate(samples, **kw):
        out = original(samples, **kw)
        generated.extend(s["response"] for s in out)
        return out

    recipe._generate = generate
    seen = _record_loss_labels(recipe, "sum_and_count")
    rows = _train(recipe)
    assert generated and all(r[:4] == [token] * 4 for r in generated)  # the student loops on one token
    assert all(r["sgo_degenerate"] == 4 for r in rows)
    assert all((labels == IGNORE).all() for labels in seen)


def test_distillm2_masks_degenerate_student_responses_and_keeps_the_teacher_term(tiny_assets, tmp_path):
    student = _collapsed_student(tiny_assets, tmp_path / "student", 0)
    recipe = _recipe(tiny_assets, tmp_path / "out", "method=distillm2", f"student.checkpoint_dir={student}",
                     "batch_size=4")
    seen = _record_loss_labels(recipe, "pair_losses")
    rows = _train(recipe)
    assert all(r["sgo_degenerate"] == 4 and r["student_rows_trained"] == 0 for r in rows)
    for labels in seen:
        assert (labels[4:] == IGNORE).all() and (labels[:4] != IGNORE).any(dim=-1).all()
    assert all(r["loss"] == pytest.approx(r["loss_skl"], rel=1e-6) for r in rows)  # b = 1: SKL only


@pytest.mark.parametrize("method, extra", [("imitkd", []), ("distillm", ["sgo.scheduler.phi0=1.0"])])
def test_sgo_starts_after_the_configured_number_of_steps(tiny_assets, tmp_path, method, extra):
    recipe = _recipe(tiny_assets, tmp_path / "out", f"method={method}", "batch_size=4", "sgo.start_after_steps=2",
                     *extra)
    calls = []
    original = recipe._generate
    recipe._generate = lambda samples, **kw: (calls.append(recipe.global_step), original(samples, **kw))[1]
    rows = _train(recipe)
    assert [r["source_sgo"] for r in rows] == [0.0, 0.0, 1.0]
    assert calls and min(calls) == 2


def test_distillm2_samples_no_student_responses_before_sgo_starts(tiny_assets, tmp_path):
    recipe = _recipe(tiny_assets, tmp_path / "out", "method=distillm2", "batch_size=4", "epochs=2",
                     "sgo.start_after_steps=2")
    rows = _train(recipe)
    steps = recipe.steps_per_epoch
    assert [r["student_rows_trained"] for r in rows] == [0.0] * steps + [4.0] * steps
    assert [r["step"] for r in rows if "student_sampling_time" in r] == [steps + 1]
