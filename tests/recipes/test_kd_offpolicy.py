"""The kd_offpolicy recipe end to end on tiny CPU assets."""

import os
import subprocess

import pytest
import torch

from conftest import (
    LORA,
    PROCESS_LOSS_REL,
    REPO,
    assert_same_losses,
    assert_same_weights,
    killer_env,
    last_by_step,
    make_cfg,
    read_metrics,
    run_recipe,
    subprocess_env,
    tune_cmd,
)
from distillm_tune.data.collate import collate_prompt_response
from distillm_tune.losses import JSDLoss, SkewForwardKLLoss


def _srkl64(student_logits, teacher_logits, labels, alpha=0.1):
    keep = labels != -100
    q = torch.softmax(student_logits.double()[keep], -1)
    p = torch.softmax(teacher_logits.double()[keep], -1)
    m = (1 - alpha) * p + alpha * q
    return (torch.xlogy(q, q) - torch.xlogy(q, m)).sum() / keep.sum()


# ---------------------------------------------------------------------------------- each method


@pytest.mark.parametrize(
    "method,extra,sources",
    [
        ("sft", [], {"dataset"}),
        ("kd", [], {"dataset"}),
        ("imitkd", [], {"sgo"}),
        ("gkd", ["sgo.gkd_sgo_prob=0.5"], {"dataset", "sgo"}),
        # phi0=1: SGO from the start, so generation and replay both happen in 3 steps
        ("distillm", ["sgo.scheduler.phi0=1.0", "gradient_accumulation_steps=2", "batch_size=4"], {"sgo", "replay"}),
    ],
)
def test_each_method_runs_end_to_end(tiny_assets, tmp_path, method, extra, sources):
    recipe, rows = run_recipe(tiny_assets, str(tmp_path), f"method={method}", *extra)
    assert [r["step"] for r in rows] == [1, 2, 3]
    seen = {s for r in rows for s in ("dataset", "sgo", "replay") if r[f"source_{s}"] > 0}
    assert seen <= sources and (len(seen) == len(sources) or method == "gkd")
    for r in rows:
        assert all(torch.isfinite(torch.tensor(v)) for v in r.values() if isinstance(v, float))
    if method == "sft":
        assert recipe.teacher is None and all(r["loss"] == r["loss_ce"] for r in rows)
    else:
        assert all(r["loss"] == pytest.approx(r["loss_div"]) for r in rows)  # kd_ratio = 1
    if method == "distillm":
        assert len(recipe.buffer) > 0 and rows[-1]["buffer_fill"] > 0
    # the distilled student is exported in HF format and transformers loads it
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.join(tmp_path, "hf_model")).eval()
    tokens = torch.tensor([recipe.valid_data[0]["prompt"]])
    recipe.student.set_num_output_chunks(0)
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, recipe.student.eval()(tokens), atol=1e-5, rtol=1e-5)


def test_seqkd_trains_on_the_given_teacher_outputs(tiny_assets, tmp_path):
    seqkd = os.path.join(tiny_assets, "data", "valid.jsonl")  # any dolly-format file of responses
    recipe, rows = run_recipe(tiny_assets, str(tmp_path), "method=seqkd", f"seqkd_data={seqkd}",
                              "batch_size=4")
    assert recipe.teacher is None and len(recipe.train_data) == 16
    assert all(r["loss"] == r["loss_ce"] for r in rows)


def test_metrics_and_config_log_say_what_the_run_did(tiny_assets, tmp_path):
    """kd logs no DistiLLM scheduler values (phi, lambda_r, buffer fill); distillm does; every
    run writes its resolved config beside its metrics (the metric logger's log_config)."""
    from omegaconf import OmegaConf

    recipe, kd = run_recipe(tiny_assets, str(tmp_path / "kd"), "method=kd")
    _, distillm = run_recipe(tiny_assets, str(tmp_path / "distillm"), "method=distillm", "sgo.scheduler.phi0=0.5")
    assert not {"phi", "lambda_r", "buffer_fill"} & set(kd[0])
    assert distillm[0]["phi"] == 0.5 and "lambda_r" in distillm[0] and "buffer_fill" in distillm[0]
    logged = OmegaConf.to_container(OmegaConf.load(tmp_path / "kd" / "config.yaml"))
    assert logged == OmegaConf.to_container(recipe.cfg, resolve=True)


def test_overrides_pick_the_divergence(tiny_assets, tmp_path):
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    recipe = KDOffPolicyRecipe(make_cfg(tiny_assets, str(tmp_path / "gkd"), "method=gkd", "loss.beta=0.9"))
    assert isinstance(recipe._build_loss(recipe.cfg.student.checkpoint_dir, recipe.cfg.teacher.checkpoint_dir), JSDLoss)
    recipe.setup()
    assert isinstance(recipe.loss_fn, JSDLoss) and recipe.loss_fn.beta == 0.9
    recipe = KDOffPolicyRecipe(make_cfg(
        tiny_assets, str(tmp_path / "distillm"), "method=distillm",
        "loss._component_=distillm_tune.losses.SkewForwardKLLoss", "loss.alpha=0.3", "loss.temperature=2.0"))
    recipe.setup()
    assert isinstance(recipe.loss_fn, SkewForwardKLLoss)
    assert (recipe.loss_fn.alpha, recipe.loss_fn.temperature) == (0.3, 2.0)


def test_first_step_loss_equals_transformers_float64_reference(tiny_assets, tmp_path):
    """The logged loss of step 1 is SRKL(0.1) of transformers' teacher and student on that batch."""
    from transformers import AutoModelForCausalLM

    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    recipe = KDOffPolicyRecipe(make_cfg(tiny_assets, str(tmp_path), "method=distillm"))
    recipe.setup()
    batch = collate_prompt_response(recipe._dataset_samples(recipe._epoch_order(0), 0), pad_id=recipe.tokenizer.pad_id)
    recipe.train()
    rows = read_metrics(str(tmp_path))
    assert rows[0]["source_dataset"] == 1.0  # phi0 = 0: the first step reads the dataset
    with torch.no_grad():
        s = AutoModelForCausalLM.from_pretrained(recipe.cfg.student.checkpoint_dir).double()(batch["tokens"]).logits
        t = AutoModelForCausalLM.from_pretrained(recipe.cfg.teacher.checkpoint_dir).double()(batch["tokens"]).logits
    assert rows[0]["loss"] == pytest.approx(float(_srkl64(s, t, batch["labels"])), rel=1e-5)


def test_gradient_accumulation_equals_one_big_batch(tiny_assets, tmp_path):
    _, big = run_recipe(tiny_assets, str(tmp_path / "big"), "method=kd", "batch_size=8")
    _, acc = run_recipe(tiny_assets, str(tmp_path / "acc"), "method=kd", "batch_size=2",
                        "gradient_accumulation_steps=4")
    assert_same_losses(acc, big, rel=1e-5)
    # summation order differs; Adam turns ~1e-9 gradient differences into ~1e-6 steps
    assert_same_weights(tmp_path / "acc", tmp_path / "big", rtol=1e-4, atol=1e-5)


def test_lora_student_exports_merged_and_peft(tiny_assets, tmp_path):
    recipe, rows = run_recipe(tiny_assets, str(tmp_path), "method=kd", LORA, "optimizer.lr=5e-2")
    trainable = {n for n, p in recipe.student.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert os.path.isfile(tmp_path / "peft_adapter" / "adapter_config.json")
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.join(tmp_path, "hf_model")).eval()
    tokens = torch.tensor([recipe.valid_data[0]["prompt"]])
    recipe.student.set_num_output_chunks(0)
    with torch.no_grad():
        ours = recipe.student.eval()(tokens)
        base = AutoModelForCausalLM.from_pretrained(recipe.cfg.student.checkpoint_dir)(tokens).logits
        torch.testing.assert_close(hf(tokens).logits, ours, atol=1e-5, rtol=1e-5)
    assert (ours - base).abs().max() > 1e-4  # the adapters did train


# ------------------------------------------------------------------------------ bad configs
# (each bad value, path and file is a probe in tests/faults/test_faults.py)


def test_teacher_with_another_tokenizer_is_rejected(tiny_assets, tmp_path):
    from distillm_tune.scripts.make_tiny_assets import make_tiny_assets

    other = make_tiny_assets(str(tmp_path / "other"), train=40, valid=4, test=4, seed=7)
    with pytest.raises(ValueError, match="config teacher.checkpoint_dir: the teacher's tokenizer"):
        run_recipe(tiny_assets, str(tmp_path / "out"), f"teacher.checkpoint_dir={other['teacher']}")


# ------------------------------------------------------------------- distributed and resume


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], [LORA, "optimizer.lr=5e-2"]], ids=["full", "lora"])
def test_two_processes_give_the_losses_of_one_with_the_same_global_batch(tiny_assets, tmp_path, extra):
    _, single = run_recipe(tiny_assets, str(tmp_path / "one"), "method=kd", "batch_size=8", *extra)
    cmd = tune_cmd(f"assets_dir={tiny_assets}", f"output_dir={tmp_path / 'two'}", "method=kd", "batch_size=4",
                   *extra, nproc=2)
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    double = read_metrics(str(tmp_path / "two"))
    assert [r["step"] for r in double] == [r["step"] for r in single]
    assert_same_losses(double, single, rel=PROCESS_LOSS_REL)
    assert double[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-5)
    assert_same_weights(tmp_path / "two", tmp_path / "one", rtol=1e-4, atol=1e-5)


RESUME_ARGS = ["method=distillm", "sgo.scheduler.phi0=1.0", "epochs=2", "save_every_n_steps=2", "batch_size=4"]


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["after_save", "during_save"])
def test_sigkill_and_resume_reproduce_the_uninterrupted_run(tiny_assets, tmp_path, phase):
    _, full = run_recipe(tiny_assets, str(tmp_path / "full"), *RESUME_ARGS)
    assert {"sgo", "replay"} <= {s for r in full for s in ("sgo", "replay") if r[f"source_{s}"] > 0}

    out = tmp_path / "killed"
    proc = subprocess.run(tune_cmd(f"assets_dir={tiny_assets}", f"output_dir={out}", *RESUME_ARGS), cwd=REPO,
                          env=killer_env(tmp_path, 4, phase), capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpt = out / "checkpoints"
    with open(ckpt / "latest") as f:
        latest = f.read().strip()
    assert latest == ("step_00000004" if phase == "after_save" else "step_00000002")
    if phase == "during_save":
        assert (ckpt / ".step_00000004.tmp").is_dir()  # the torn write is left aside, not used

    _, resumed = run_recipe(tiny_assets, str(out), *RESUME_ARGS, "resume_from_checkpoint=true")
    # one row per step: the replayed steps' earlier rows were dropped (the step-0 row included once)
    assert [r["step"] for r in read_metrics(str(out), with_start=True)] == \
        [r["step"] for r in read_metrics(str(tmp_path / "full"), with_start=True)]
    last = last_by_step(resumed)
    assert sorted(last) == [1, 2, 3, 4, 5, 6]
    for r in full:
        assert last[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-6), r["step"]
        for key in ("phi", "buffer_fill", "source_sgo", "source_replay"):
            assert last[r["step"]][key] == r[key], (r["step"], key)
    assert_same_weights(out, tmp_path / "full", rtol=0, atol=1e-6)
    assert not (ckpt / ".step_00000004.tmp").exists()  # cleaned up by the next save


def test_lm_term_on_pretraining_text(tiny_assets, tmp_path):
    """loss = divergence + lm.coef * LM, and the LM part of step 1 is transformers' CE on the
    first packed blocks."""
    from transformers import AutoModelForCausalLM

    from distillm_tune.data.pretrain import PackedTextDataset, collate_packed
    from distillm_tune.models import load_hf_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"the {w} is next to the lake and the road number {i}." for i, w in
                                enumerate(["fox", "owl", "cat", "dog", "bee", "elk"] * 20)))
    lm = [f"lm.dataset={{_component_: distillm_tune.data.pretrain_dataset, source: {corpus}, max_seq_len: 32}}",
          "lm.coef=0.5", "lm.batch_size=3"]
    recipe, rows = run_recipe(tiny_assets, str(tmp_path / "out"), "method=kd", *lm)
    for r in rows:
        assert r["loss"] == pytest.approx(r["loss_div"] + 0.5 * r["loss_lm"], rel=1e-6)
    blocks = collate_packed([PackedTextDataset(str(corpus), load_hf_tokenizer(recipe.student_dir), 32)[i] for i in range(3)])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(recipe.student_dir)(blocks["tokens"]).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), blocks["labels"].reshape(-1))
    assert rows[0]["loss_lm"] == pytest.approx(float(ce), rel=1e-5)


def test_activation_checkpointing_gives_the_same_training(tiny_assets, tmp_path):
    _, plain = run_recipe(tiny_assets, str(tmp_path / "plain"), "method=distillm", "sgo.scheduler.phi0=1.0")
    _, ac = run_recipe(tiny_assets, str(tmp_path / "ac"), "method=distillm", "sgo.scheduler.phi0=1.0",
                       "enable_activation_checkpointing=true")
    assert_same_losses(ac, plain, rel=1e-6)
    assert_same_weights(tmp_path / "ac", tmp_path / "plain", rtol=1e-5, atol=1e-6)


def test_bf16_models_train_with_fp32_losses(tiny_assets, tmp_path):
    recipe, rows = run_recipe(tiny_assets, str(tmp_path), "method=distillm", "sgo.scheduler.phi0=1.0", "dtype=bf16")
    assert next(recipe.student.parameters()).dtype == torch.bfloat16
    assert next(recipe.teacher.parameters()).dtype == torch.bfloat16
    for r in rows:
        assert torch.isfinite(torch.tensor([r["loss"], r["loss_ce"], r["grad_norm"]])).all()
    # on the same (dataset) batch, bf16 models give the fp32 loss up to bf16 rounding
    _, kd16 = run_recipe(tiny_assets, str(tmp_path / "kd16"), "method=kd", "dtype=bf16")
    _, kd32 = run_recipe(tiny_assets, str(tmp_path / "kd32"), "method=kd")
    assert kd16[0]["loss"] == pytest.approx(kd32[0]["loss"], rel=0.05)
    assert kd16[0]["loss_ce"] == pytest.approx(kd32[0]["loss_ce"], rel=0.01)


@pytest.mark.parametrize("setting,expected", [([], True), (["sgo.pack_weights=false"], False)])
def test_sgo_pack_weights_reaches_the_sampler(tiny_assets, tmp_path, setting, expected):
    """``sgo.pack_weights`` (default true) is what every on-policy generation call is given."""
    from unittest import mock

    from distillm_tune.training import model_io

    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["pack_weights"])
        return real(*args, **kwargs)

    real = model_io.generate_responses
    with mock.patch.object(model_io, "generate_responses", spy):
        run_recipe(tiny_assets, str(tmp_path), "method=imitkd", *setting)
    assert seen and all(v is expected for v in seen)


def test_validation_rouge_is_logged_and_the_best_student_exported(tiny_assets, tmp_path):
    """Validation every step with ROUGE-L on 6 rows in batches of 4: each logged value equals a
    direct rouge_score computation on the same greedy generations; hf_model_best holds the best."""
    from rouge_score import rouge_scorer

    from distillm_tune.models import load_hf, load_hf_tokenizer
    from distillm_tune.sgo import generate_responses

    recipe, rows = run_recipe(tiny_assets, str(tmp_path), "method=kd", "validation.every_n_steps=1",
                              "validation.rouge_examples=6", "validation.batch_size=4", "optimizer.lr=3e-3")
    scores = [r["val_rouge_l"] for r in rows]
    assert len(scores) == 3
    best_dir = os.path.join(tmp_path, "hf_model_best")
    model, tok = load_hf(best_dir).eval(), load_hf_tokenizer(best_dir)
    out = generate_responses(model, [recipe.valid_data[i]["prompt"] for i in range(6)], max_new_tokens=8,
                             eos_ids=[tok.eos_id], pad_id=tok.pad_id, temperature=0.0)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    direct = [max(scorer.score(ref, tok.decode([t for t in o["response"] if t != tok.eos_id]).strip())["rougeL"].fmeasure
                  for ref in recipe.valid_data.examples[i].references) * 100 for i, o in enumerate(out)]
    assert sum(direct) / 6 == pytest.approx(max(scores), abs=1e-6)


# ---------------------------------------------------------------------------------- fused loss


@pytest.mark.parametrize("method,extra", [
    # generation and replay micro-batches (as in test_each_method_runs_end_to_end)
    ("distillm", ["sgo.scheduler.phi0=1.0", "gradient_accumulation_steps=2", "batch_size=4"]),
    ("gkd", ["loss.temperature=2.0"]),
    ("kd", [LORA, "optimizer.lr=5e-2"]),  # LoRA student: the head stays a plain tied layer
    ("kd", ["dtype=bf16"]),
])
def test_fused_loss_trains_like_the_logits_path(tiny_assets, tmp_path, method, extra):
    """fused_loss_chunk_size: the divergence from hidden states and head weights, a few tokens at a
    time, gives the same losses, batches and weights as the default path over the logits."""
    _, plain = run_recipe(tiny_assets, str(tmp_path / "plain"), f"method={method}", *extra)
    _, fused = run_recipe(tiny_assets, str(tmp_path / "fused"), f"method={method}", *extra,
                          "fused_loss_chunk_size=7")
    assert len(fused) == len(plain) == 3
    bf16 = "dtype=bf16" in extra  # bf16 matmuls in another order: equal up to bf16 rounding
    assert_same_losses(fused, plain, rel=2e-2 if bf16 else 1e-5, keys=("loss", "loss_div", "loss_ce"))
    for a, b in zip(fused, plain):
        assert [a[f"source_{s}"] for s in ("dataset", "sgo", "replay")] == \
            [b[f"source_{s}"] for s in ("dataset", "sgo", "replay")]
    assert {s for r in plain for s in ("sgo", "replay") if r[f"source_{s}"] > 0} >= (
        {"sgo", "replay"} if method == "distillm" else set())
    assert_same_weights(tmp_path / "fused", tmp_path / "plain",
                         rtol=2e-2 if bf16 else 1e-4, atol=2e-2 if bf16 else 1e-5)


@pytest.mark.parametrize("extra", [[], [LORA, "optimizer.lr=5e-2"], ["loss.temperature=2.0", "kd_ratio=0.3"]],
                         ids=["full", "lora", "T2-kd0.3"])
def test_fused_loss_with_kd_ratio_below_one_trains_like_the_logits_path(tiny_assets, tmp_path, extra):
    """kd_ratio < 1 with fused_loss_chunk_size: the CE term trains from the same chunked pass as the
    divergence; losses (both terms, as logged), gradient norms and weights equal the logits path."""
    args = ["method=kd", "kd_ratio=0.5", *extra]
    _, plain = run_recipe(tiny_assets, str(tmp_path / "plain"), *args)
    _, fused = run_recipe(tiny_assets, str(tmp_path / "fused"), *args, "fused_loss_chunk_size=7")
    assert len(fused) == len(plain) == 3
    assert_same_losses(fused, plain, rel=1e-5, keys=("loss", "loss_div", "loss_ce", "grad_norm"))
    assert fused[-1]["val_loss"] == pytest.approx(plain[-1]["val_loss"], rel=1e-5)
    assert_same_weights(tmp_path / "fused", tmp_path / "plain", rtol=1e-4, atol=1e-5)


def _setup_recipe(assets, output_dir, *overrides):
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    recipe = KDOffPolicyRecipe(make_cfg(assets, output_dir, *overrides))
    recipe.setup()
    return recipe


def test_fused_loss_gradients_and_logged_cross_entropy_come_from_one_pass(tiny_assets, tmp_path, monkeypatch):
    """One micro-batch, kd_ratio 0.5: the fused path's loss, D and CE sums and every student
    gradient equal the logits path's; the student's head is applied once per chunk of response
    tokens, in that one pass (the CE logged is not a second pass over the head)."""
    from distillm_tune.recipes import kd_offpolicy
    from distillm_tune.training.model_io import output_projection

    args = ["method=kd", "kd_ratio=0.5"]
    plain = _setup_recipe(tiny_assets, str(tmp_path / "plain"), *args)
    fused = _setup_recipe(tiny_assets, str(tmp_path / "fused"), *args, "fused_loss_chunk_size=7")
    _, batch = plain._prepare_micro_batch(plain._epoch_order(0), 0)
    n_tokens = int((batch["labels"] != -100).sum())
    head = output_projection(fused.student)[0]
    calls = []
    linear = torch.nn.functional.linear

    def counting_linear(x, w, *rest, **kw):
        calls.append(w is head)
        return linear(x, w, *rest, **kw)

    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    monkeypatch.setattr(kd_offpolicy, "cross_entropy_sum_and_count", lambda *a, **k: pytest.fail("second CE pass"))
    got = fused._loss_sums(batch)
    monkeypatch.undo()
    assert sum(calls) == -(-n_tokens // 7)  # once per chunk
    ref = plain._loss_sums(batch)
    for g, r, name in zip(got, ref, ("loss", "D", "CE")):
        assert float(g.detach()) == pytest.approx(float(r.detach()), rel=1e-6), name
    got[0].backward()
    ref[0].backward()
    grads = dict(plain.student.named_parameters())
    for name, p in fused.student.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    plain.cleanup()
    fused.cleanup()


@pytest.mark.slow
@pytest.mark.parametrize("kd_ratio", ["1.0", "0.5"])
@pytest.mark.parametrize("extra", [[], [LORA, "optimizer.lr=5e-2"]], ids=["full", "lora"])
def test_fused_loss_on_two_fsdp_processes_equals_the_logits_path_on_one(tiny_assets, tmp_path, extra, kd_ratio):
    """fused_loss_chunk_size under FSDP2 (2 processes, batch 4 each; the tiny GPT-2's head is tied
    to the embedding): the loss runs inside the student's forward, so the root's hooks gather the
    head and reduce-scatter its gradient. Per-step losses (both terms), validation loss and final
    weights equal the logits path on one process with the same global batch."""
    args = ["method=kd", f"kd_ratio={kd_ratio}", *extra]
    _, single = run_recipe(tiny_assets, str(tmp_path / "one"), *args, "batch_size=8")
    cmd = tune_cmd(f"assets_dir={tiny_assets}", f"output_dir={tmp_path / 'two'}", *args, "batch_size=4",
                   "fused_loss_chunk_size=7", nproc=2)
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    double = read_metrics(str(tmp_path / "two"))
    assert [r["step"] for r in double] == [r["step"] for r in single] == [1, 2, 3]
    assert_same_losses(double, single, rel=PROCESS_LOSS_REL, keys=("loss", "loss_div", "loss_ce", "grad_norm"))
    assert double[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-5)
    assert_same_weights(tmp_path / "two", tmp_path / "one", rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overrides, match", [
    (["method=sft"], "fused_loss_chunk_size: method=sft has no divergence"),
    (["fused_loss_chunk_size=0"], "fused_loss_chunk_size: expected an integer >= 1 or null, got 0"),
])
def test_fused_loss_settings_that_cannot_work_are_rejected(tiny_assets, tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run_recipe(tiny_assets, str(tmp_path), "fused_loss_chunk_size=16", *overrides)


@pytest.mark.parametrize("kd_ratio", [1.0, 0.5])
def test_cross_entropy_has_a_graph_only_when_it_is_in_the_loss(tiny_assets, tmp_path, kd_ratio):
    """kd_ratio=1: the CE is only logged, so it is computed without autograd (no log-softmax
    [tokens, V] kept until backward, no backward pass over it); the student's gradient is the
    divergence's, as before. kd_ratio<1: the CE is in the loss and keeps its graph."""
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    recipe = KDOffPolicyRecipe(make_cfg(tiny_assets, str(tmp_path), "method=kd", f"kd_ratio={kd_ratio}"))
    recipe.setup()
    _, batch = recipe._prepare_micro_batch(recipe._epoch_order(0), 0)
    recipe.student.train()
    loss_sum, div_sum, ce_sum = recipe._loss_sums(batch)
    assert div_sum.requires_grad and ce_sum.requires_grad == (kd_ratio < 1)
    loss_sum.backward()
    grads = [p.grad.clone() for p in recipe.student.parameters() if p.requires_grad]
    recipe.student.zero_grad(set_to_none=True)
    logits = recipe.io.forward(recipe.student, batch, recipe.device)
    with torch.no_grad():
        t_logits = recipe.io.forward(recipe.teacher, batch, recipe.device)
    labels = batch["labels"]
    ref_div, _ = recipe.loss_fn.sum_and_count(logits, t_logits, labels)
    ref_ce = torch.nn.functional.cross_entropy(torch.cat(logits, 1).flatten(0, 1), labels.flatten(), reduction="sum")
    assert float(ce_sum.detach()) == pytest.approx(float(ref_ce.detach()), rel=1e-5)
    (kd_ratio * ref_div + (1 - kd_ratio) * ref_ce).backward()
    ref = [p.grad for p in recipe.student.parameters() if p.requires_grad]
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    recipe.cleanup()
