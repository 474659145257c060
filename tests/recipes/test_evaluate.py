"""The evaluation recipe: end to end through ``tune run``, scores recomputed independently.

References: ROUGE-L straight from ``rouge_score`` and BLEU from ``sacrebleu`` on the written
generations; greedy outputs from a plain uncached argmax loop over the model (full forward each
step, no KV cache, no padding).
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "evaluate_tiny.yaml")
SEEDS = [10, 20, 30, 40, 50]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cli_run(small_assets, tmp_path_factory):
    """The user's command line, run once; returns the output directory."""
    out = str(tmp_path_factory.mktemp("eval_cli"))
    tune = shutil.which("tune")
    launcher = [tune] if tune else [sys.executable, "-m", "torchtune._cli.tune"]
    cmd = launcher + ["run", "distillm_tune/recipes/evaluate", "--config",
                      "configs/evaluate_tiny.yaml", f"assets_dir={small_assets}", f"output_dir={out}",
                      "max_examples=8"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def _run_in_process(assets, out, **overrides):
    from distillm_tune.recipes.evaluate import EvaluateRecipe

    cfg = OmegaConf.merge(OmegaConf.load(CONFIG),
                          OmegaConf.create({"assets_dir": assets, "output_dir": str(out),
                                            "max_examples": 8, **overrides}))
    recipe = EvaluateRecipe(cfg)
    recipe.setup()
    results = recipe.evaluate()
    recipe.cleanup()
    return results, _generations(out)


def _generations(out):
    with open(os.path.join(out, "generations.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_cli_writes_results_table_and_generations(cli_run):
    results = json.load(open(os.path.join(cli_run, "results.json")))
    res = results["datasets"]["dolly_tiny"]
    assert (res["kind"], res["n"], res["decoding"]) == ("instruction", 8, "sampling")
    assert list(res["metrics"]["rougeL"]["per_seed"]) == [str(s) for s in SEEDS]
    table = open(os.path.join(cli_run, "results.md")).read().splitlines()
    assert table[0] == "| dataset | metric | mean ± std | n |"
    m = res["metrics"]["rougeL"]
    assert table[2] == f"| dolly_tiny | ROUGE-L | {m['mean']:.2f} ± {m['std']:.2f} | 8 |"
    gens = _generations(cli_run)
    assert len(gens) == 8 * len(SEEDS)
    assert {g["seed"] for g in gens} == set(SEEDS)
    first = gens[0]
    assert set(first) == {"dataset", "seed", "index", "prompt", "generation", "references"}
    assert first["prompt"].endswith("### Response:\n") and first["references"]
    assert all(g["generation"] == g["generation"].strip() for g in gens)


def test_rouge_l_equals_rouge_score_recomputation(cli_run):
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    gens = _generations(cli_run)
    per_seed = []
    for seed in SEEDS:
        rows = sorted((g for g in gens if g["seed"] == seed), key=lambda g: g["index"])
        assert [g["index"] for g in rows] == list(range(8))
        per_seed.append(np.mean([max(scorer.score(ref, g["generation"])["rougeL"].fmeasure * 100
                                     for ref in g["references"]) for g in rows]))
    m = json.load(open(os.path.join(cli_run, "results.json")))["datasets"]["dolly_tiny"]["metrics"]["rougeL"]
    assert list(m["per_seed"].values()) == pytest.approx(per_seed, abs=1e-9)
    assert m["mean"] == pytest.approx(np.mean(per_seed), abs=1e-9)
    assert m["std"] == pytest.approx(np.std(per_seed), abs=1e-9)


def test_same_seed_gives_same_generations(cli_run, small_assets, tmp_path):
    # Another process, seed 30 alone (not after 10 and 20): each seed has its own generator.
    _, again = _run_in_process(small_assets, tmp_path, seeds=[30])
    first = [g for g in _generations(cli_run) if g["seed"] == 30]
    assert [g["generation"] for g in again] == [g["generation"] for g in first]
    by_seed = {s: [g["generation"] for g in _generations(cli_run) if g["seed"] == s] for s in SEEDS}
    assert by_seed[10] != by_seed[20]  # the seed really drives the sampling


def test_greedy_equals_uncached_argmax_loop(small_assets, tmp_path):
    from distillm_tune.models.hf import load_hf, load_hf_tokenizer

    data = os.path.join(small_assets, "data", "test.jsonl")
    results, gens = _run_in_process(
        small_assets, tmp_path, max_examples=3, batch_size=3, greedy_max_new_tokens=20,
        datasets=[{"name": "greedy", "path": data, "kind": "summarization"}])
    res = results["datasets"]["greedy"]
    assert (res["decoding"], list(res["metrics"]["rougeL"]["per_seed"])) == ("greedy", ["greedy"])
    assert res["metrics"]["rougeL"]["std"] == 0.0 and [g["seed"] for g in gens] == [None] * 3

    student = os.path.join(small_assets, "student")
    model, tok = load_hf(student).eval(), load_hf_tokenizer(student)
    lengths = set()
    for g in gens:
        ids = tok.encode(g["prompt"], add_bos=True, add_eos=False)
        lengths.add(len(ids))
        out = []
        with torch.no_grad():
            for _ in range(20):
                nxt = int(model(torch.tensor([ids + out]))[0, -1].argmax())
                if nxt == tok.eos_id:
                    break
                out.append(nxt)
        assert g["generation"] == tok.decode(out).strip()
    assert len(lengths) > 1  # the batch really was left-padded


def test_missing_paths_name_the_config_key(small_assets, tmp_path):
    from distillm_tune.recipes.evaluate import EvaluateRecipe

    base = OmegaConf.merge(OmegaConf.load(CONFIG), {"assets_dir": small_assets, "output_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="model_dir"):
        EvaluateRecipe(OmegaConf.merge(base, {"model_dir": str(tmp_path / "nope")}))
    bad = [{"name": "x", "path": str(tmp_path / "nope.jsonl"), "kind": "instruction"}]
    with pytest.raises(FileNotFoundError, match=r"datasets\[0\]\.path"):
        EvaluateRecipe(OmegaConf.merge(base, {"datasets": bad}))
    bad = [{"name": "x", "path": os.path.join(small_assets, "data", "test.jsonl"), "kind": "qa"}]
    with pytest.raises(ValueError, match=r"datasets\[0\]\.kind"):
        EvaluateRecipe(OmegaConf.merge(base, {"datasets": bad}))
    with pytest.raises(ValueError, match="positions"):  # the tiny GPT-2 has 256 positions
        EvaluateRecipe(OmegaConf.merge(base, {"max_seq_len": 512})).setup()


def _with_nonfinite_weight(src, dst, value):
    """A copy of checkpoint ``src`` in ``dst`` with one attention weight set to ``value``; its name."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    sd = load_file(os.path.join(dst, "model.safetensors"))
    name = next(k for k in sd if "attn" in k and sd[k].is_floating_point())
    sd[name].view(-1)[3] = value
    save_file(sd, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return name


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_are_refused_naming_the_tensor(small_assets, tmp_path, value):
    """A damaged checkpoint would otherwise be scored (ROUGE-L 0.00 from garbage, exit 0)."""
    from distillm_tune.recipes.evaluate import EvaluateRecipe

    name = _with_nonfinite_weight(os.path.join(small_assets, "student"), tmp_path / "student", value)
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), {"assets_dir": small_assets, "output_dir": str(tmp_path / "out"),
                                                   "model_dir": str(tmp_path / "student")})
    recipe = EvaluateRecipe(cfg)
    with pytest.raises(ValueError, match=rf"model_dir: .* holds non-finite weights in 1 tensors \(first: {name} in "
                                         r"model.safetensors\)"):
        recipe.setup()
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_bad_eval_file_is_refused_before_the_model_loads(small_assets, tmp_path, monkeypatch):
    import distillm_tune.recipes.evaluate as evaluate

    monkeypatch.setattr(evaluate, "load_hf", lambda *a, **k: pytest.fail("the model was loaded"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), {"assets_dir": small_assets, "output_dir": str(tmp_path / "out"),
                                                   "datasets": [{"name": "e", "path": str(empty), "kind": "instruction"}]})
    with pytest.raises(ValueError, match=r"dataset 'e' .* has no examples"):
        evaluate.EvaluateRecipe(cfg).setup()


def _tiny_t5(path):
    """A random T5 v1.1 checkpoint with a SentencePiece tokenizer trained here."""
    spm = pytest.importorskip("sentencepiece")
    from transformers import T5Config, T5ForConditionalGeneration

    words = "the cat sat on a mat dog ran to house red blue green big small tree".split()
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=rng.integers(3, 8))) for _ in range(200)]
    (path / "corpus.txt").write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(path / "corpus.txt"), model_prefix=str(path / "spiece"), vocab_size=32,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        minloglevel=2)
    torch.manual_seed(0)
    config = T5Config(vocab_size=132, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    hf = T5ForConditionalGeneration(config)
    hf.lm_head.weight = torch.nn.Parameter(torch.randn(132, 32))  # untied, as test_t5 does
    hf.save_pretrained(str(path))
    return lines


def test_t5_translation_greedy_bleu(tmp_path):
    import sacrebleu

    from distillm_tune.models.hf import load_hf, load_hf_tokenizer

    model_dir = tmp_path / "t5"
    model_dir.mkdir()
    lines = _tiny_t5(model_dir)
    data = tmp_path / "iwslt.jsonl"
    data.write_text("".join(json.dumps({"translation": {"en": a, "de": b}}) + "\n"
                            for a, b in zip(lines[:4], lines[4:8])))
    results, gens = _run_in_process(
        str(tmp_path), tmp_path / "out", model_dir=str(model_dir), batch_size=4,
        greedy_max_new_tokens=12, datasets=[{"name": "iwslt", "path": str(data), "kind": "translation"}])
    metrics = results["datasets"]["iwslt"]["metrics"]
    preds, refs = [g["generation"] for g in gens], [g["references"][0] for g in gens]
    assert metrics["bleu"]["mean"] == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert gens[0]["prompt"] == "translate English to German: " + lines[0]

    model, tok = load_hf(str(model_dir)).eval(), load_hf_tokenizer(str(model_dir))
    for g in gens:
        src = torch.tensor([tok.encode(g["prompt"], add_eos=True)])
        out = []
        with torch.no_grad():
            for _ in range(12):
                nxt = int(model(src, torch.tensor([[0] + out]))[0, -1].argmax())
                if nxt == tok.eos_id:
                    break
                out.append(nxt)
        assert g["generation"] == tok.decode(out).strip()


def test_greedy_decoding_of_instruction_sets_and_skipped_bad_rows(small_assets, tmp_path):
    """``decoding: greedy``: one temperature-0 run of an instruction set, the same at any batch size;
    ``on_bad_row: skip``: a row with an empty reference is left out (counted), where the default
    stops with its file and line."""
    rows = [json.loads(line) for line in open(os.path.join(small_assets, "data", "test.jsonl"))][:4]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows[:2] + [{**rows[2], "response": ""}] + rows[3:]))
    datasets = [{"name": "dolly", "path": str(data), "kind": "instruction"}]
    with pytest.raises(ValueError, match="rows.jsonl:3"):
        _run_in_process(small_assets, tmp_path / "strict", datasets=datasets)
    results, gens = _run_in_process(small_assets, tmp_path / "greedy", datasets=datasets, decoding="greedy",
                                    on_bad_row="skip")
    res = results["datasets"]["dolly"]
    assert (res["decoding"], list(res["metrics"]["rougeL"]["per_seed"])) == ("greedy", ["greedy"])
    assert [g["seed"] for g in gens] == [None] * 3
    again, _ = _run_in_process(small_assets, tmp_path / "again", datasets=datasets, decoding="greedy",
                               on_bad_row="skip", batch_size=1)
    assert again["datasets"]["dolly"]["metrics"] == res["metrics"]  # greedy: no seed, batch-independent
    with pytest.raises(ValueError, match="decoding"):
        _run_in_process(small_assets, tmp_path / "bad", datasets=datasets, decoding="beam")
