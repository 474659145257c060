"""The README's first command, shortened: every stage runs, and the greedy ROUGE-L it reports equals
an independent computation (transformers' greedy decoding of the exported model + rouge_score)."""

import json
import os

import pytest
import torch

from distillm_tune.scripts import demo


def _reference_greedy_rouge(model_dir, data, limit):
    """transformers' own greedy decoding of the exported checkpoint, one prompt at a time (no
    padding), scored with rouge_score directly: ROUGE-L F x 100 with stemming, max over references."""
    from rouge_score import rouge_scorer
    from transformers import AutoModelForCausalLM

    from distillm_tune.data import instruction_dataset
    from distillm_tune.models import load_hf_tokenizer

    tok = load_hf_tokenizer(model_dir)
    ds = instruction_dataset(tok, data, split="all", max_prompt_len=64, max_seq_len=96)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = []
    for j in range(min(limit, len(ds))):
        prompt = torch.tensor([ds[j]["prompt"]])
        with torch.no_grad():
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=32, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        new = [t for t in out[0, prompt.shape[1]:].tolist() if t != tok.eos_id]
        pred = tok.decode(new).strip()
        scores.append(max(scorer.score(ref, pred)["rougeL"].fmeasure for ref in ds.examples[j].references))
    return 100.0 * sum(scores) / len(scores)


@pytest.mark.slow
def test_demo_end_to_end_short(tmp_path):
    out = tmp_path / "demo"
    demo.main(["--out", str(out), "--teacher-epochs", "1", "--student-epochs", "1", "--distil-epochs", "1",
               "--steps-per-epoch", "6", "--eval-examples", "12", "--eval-seeds", "10 20"])
    results = json.loads((out / "results.json").read_text())
    names = ["teacher (SFT)", "student (SFT)", "student (kd)", "student (distillm)"]
    assert list(results) == names
    for name in names:
        r = results[name]
        assert r["steps"] == 6 and r["train_wall_s"] > 0
        assert 0.0 <= r["rouge_l"] <= 100.0
        assert 0.0 <= r["rouge_l_sampled"]["mean"] <= 100.0 and r["rouge_l_sampled"]["std"] >= 0.0
    # the sampled column comes from the evaluate recipe, one sampling run per seed
    ev = json.loads((out / "kd" / "eval" / "results.json").read_text())
    per_seed = ev["datasets"]["test"]["metrics"]["rougeL"]["per_seed"]
    assert sorted(int(s) for s in per_seed) == [10, 20]
    test = os.path.join(out, "assets", "data", "test.jsonl")
    for run_dir, name in (("teacher_sft", "teacher (SFT)"), ("kd", "student (kd)")):
        want = _reference_greedy_rouge(str(out / run_dir / "hf_model"), test, 12)
        assert results[name]["rouge_l"] == pytest.approx(want, abs=0.006)
    table = (out / "results.md").read_text().splitlines()
    assert "sampled (2 seeds)" in table[0] and len(table) == 2 + len(names)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the distillm student really used student-generated outputs (phi0 = 0.2)
    rows = [json.loads(x) for x in (out / "distillm" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["phi"] == pytest.approx(0.2)
    # run again into the same folder: every run starts afresh (overwrite=true), nothing is mixed in
    demo.main(["--out", str(out), "--teacher-epochs", "1", "--student-epochs", "1", "--distil-epochs", "1",
               "--steps-per-epoch", "4", "--eval-examples", "12", "--eval-seeds", ""])
    again = json.loads((out / "results.json").read_text())
    assert [again[n]["steps"] for n in names] == [4, 4, 4, 4]
    rows = [json.loads(x) for x in (out / "kd" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
