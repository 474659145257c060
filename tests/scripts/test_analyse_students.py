"""benchmarks/analyse_students.py: its teacher-forced statistics equal the same quantities computed
from transformers' own model on the same token ids (float64)."""

import importlib.util
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from distillm_tune.data import instruction_dataset
from distillm_tune.data.collate import collate_prompt_response
from distillm_tune.models import load_hf_tokenizer
from distillm_tune.scripts.reproduce import PAIRS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script():
    spec = importlib.util.spec_from_file_location("analyse_students", os.path.join(REPO, "benchmarks", "analyse_students.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_token_stats_equal_transformers_float64(tiny_assets, one_thread):
    pair = PAIRS["tiny"]
    model_dir, data = os.path.join(tiny_assets, "student"), os.path.join(tiny_assets, "data", "valid.jsonl")
    got = _script().token_stats(model_dir, data, pair, limit=10, batch_size=4)
    tok = load_hf_tokenizer(model_dir)
    ds = instruction_dataset(tok, data, split="all", max_prompt_len=pair.max_prompt_len,
                             max_seq_len=pair.max_prompt_len + pair.max_new_tokens, template=pair.template)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float64).eval()
    ent, p, top, n = [], [], [], 0
    for j in range(10):  # one row at a time: no padding involved in the reference
        b = collate_prompt_response([ds[j]], tok.pad_id)
        with torch.no_grad():
            logp = torch.log_softmax(hf(b["tokens"]).logits[0], -1)
        for t, ref in enumerate(b["labels"][0].tolist()):
            if ref == -100:
                continue
            ent.append(float(-(logp[t].exp() * logp[t]).sum()))
            p.append(float(logp[t, ref].exp()))
            top.append(float(logp[t].argmax() == ref))
            n += 1
    assert got["tokens"] == n > 0
    assert got["entropy"] == pytest.approx(sum(ent) / n, rel=1e-5)
    assert got["p_ref"] == pytest.approx(sum(p) / n, rel=1e-5)
    assert got["top1"] == pytest.approx(sum(top) / n, abs=1e-9)
