"""SeqKD data generation: dolly rows the instruction dataset reads, equal to the sampler's output."""

import json
import os

import pytest
import torch

from distillm_tune.data.instruction import InstructionDataset, load_dolly_rows
from distillm_tune.models.hf import load_hf, load_hf_tokenizer
from distillm_tune.scripts.generate_seqkd import generate_seqkd, main
from distillm_tune.sgo.sampler import generate_responses

MAX_SEQ_LEN = 80


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _read(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_rows_are_dolly_format_and_equal_direct_sampling(small_assets, tmp_path):
    teacher, data = os.path.join(small_assets, "teacher"), os.path.join(small_assets, "data", "train.jsonl")
    tok = load_hf_tokenizer(teacher)
    examples, _ = load_dolly_rows(data)
    lengths = [len(tok.encode(ex.prompt, add_bos=True)) for ex in examples]
    max_prompt_len = sorted(lengths)[len(lengths) // 2]  # about half the prompts fit
    kept = [(ex, n) for ex, n in zip(examples, lengths) if n <= max_prompt_len]
    assert 0 < len(kept) < len(examples)

    out = str(tmp_path / "seqkd.jsonl")
    stats = generate_seqkd(teacher, data, out, batch_size=4, max_prompt_len=max_prompt_len,
                           max_seq_len=MAX_SEQ_LEN, seed=3, device="cpu")
    rows = _read(out)
    assert not os.path.exists(out + ".tmp")

    # Independent: the sampler called directly, same batches, one generator with the same seed;
    # responses get one token less than the budget, leaving room for the EOS the dataset appends.
    model = load_hf(teacher).eval()
    generator = torch.Generator().manual_seed(3)
    expected, empty = [], 0
    for start in range(0, len(kept), 4):
        batch = kept[start : start + 4]
        prompts = [tok.encode(ex.prompt, add_bos=True) for ex, _ in batch]
        for (ex, _), prompt, s in zip(batch, prompts, generate_responses(
                model, prompts, max_new_tokens=MAX_SEQ_LEN - max_prompt_len - 1, eos_ids=[tok.eos_id],
                pad_id=tok.pad_id, temperature=1.0, generator=generator)):
            ids = s["response"]
            body = ids[: ids.index(tok.eos_id)] if tok.eos_id in ids else ids
            text = tok.decode(body).strip()
            empty += not text
            if text:
                expected.append(({"instruction": ex.instruction, "context": ex.input,
                                  "response": text, "category": ex.category}, body, prompt))
    # a text the training data would encode longer than the budget (decoding and encoding again
    # need not give the sampled ids back) is written cut to a prefix of its ids that fits

    def fits(prompt, text):
        return len(prompt) + len(tok.encode(text, add_bos=False, add_eos=True)) <= MAX_SEQ_LEN

    assert len(rows) == len(expected)
    cut = 0
    for row, (want, body, prompt) in zip(rows, expected, strict=True):
        if fits(prompt, want["response"]):
            assert row == want
        else:
            cut += 1
            assert {**row, "response": None} == {**want, "response": None}
            assert fits(prompt, row["response"])
            assert row["response"] in {tok.decode(body[:k]).strip() for k in range(1, len(body))}
    assert stats.get("cut_to_fit") == cut
    assert len(rows) == stats.kept == len(kept) - empty
    assert stats.get("skipped_long_prompt") == len(examples) - len(kept)
    assert stats.get("skipped_empty_response") == empty

    # The KD recipe's normal instruction dataset reads the file as it is.
    ds = InstructionDataset(out, tok, split="all", max_prompt_len=max_prompt_len,
                            max_seq_len=4 * MAX_SEQ_LEN)
    assert len(ds) == len(rows)
    assert [ex.reference for ex in ds.examples] == [r["response"] for r in rows]


def test_counts_and_errors(small_assets, tmp_path):
    teacher, data = os.path.join(small_assets, "teacher"), os.path.join(small_assets, "data", "train.jsonl")
    out = str(tmp_path / "a.jsonl")
    main(["--model-dir", teacher, "--data", data, "--out", out, "--max-prompt-len", "10",
          "--max-seq-len", "20", "--device", "cpu"])  # the CLI; every prompt is over budget
    assert _read(out) == []
    with pytest.raises(FileNotFoundError, match="--model-dir"):
        generate_seqkd(str(tmp_path / "nope"), data, out)
    with pytest.raises(FileNotFoundError, match="--data"):
        generate_seqkd(teacher, str(tmp_path / "nope.jsonl"), out)
    with pytest.raises(ValueError, match="positions"):  # the tiny teacher has 256 positions
        generate_seqkd(teacher, data, out, max_prompt_len=256, max_seq_len=512, device="cpu")


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-1.0), r"--temperature must be >= 0"),
    (dict(top_p=0.0), r"--top-p must lie in \(0, 1\]"),
    (dict(max_prompt_len=64, max_seq_len=64), r"--max-prompt-len < --max-seq-len, got --max-prompt-len 64, --max-seq-len 64"),
    (dict(out_is_folder=True), r"--out .* is a folder"),
])
def test_bad_flags_are_refused_before_the_teacher_loads(small_assets, tmp_path, monkeypatch, kwargs, message):
    import distillm_tune.scripts.generate_seqkd as script

    monkeypatch.setattr(script, "load_hf", lambda *a, **k: pytest.fail("the teacher was loaded"))
    out = str(tmp_path) if kwargs.pop("out_is_folder", False) else str(tmp_path / "a.jsonl")
    with pytest.raises(ValueError, match=message):
        script.generate_seqkd(os.path.join(small_assets, "teacher"), os.path.join(small_assets, "data", "train.jsonl"),
                              out, **kwargs)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_teacher_with_nonfinite_weights_is_refused_naming_the_tensor(small_assets, tmp_path, value):
    """Would otherwise write rows of garbage text with exit code 0."""
    import shutil

    from safetensors.torch import load_file, save_file

    teacher = tmp_path / "teacher"
    shutil.copytree(os.path.join(small_assets, "teacher"), teacher)
    sd = load_file(teacher / "model.safetensors")
    name = next(k for k in sd if "mlp" in k and sd[k].is_floating_point())
    sd[name].view(-1)[0] = value
    save_file(sd, teacher / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "a.jsonl"
    with pytest.raises(ValueError, match=rf"--model-dir: .* holds non-finite weights in 1 tensors \(first: {name} "):
        generate_seqkd(str(teacher), os.path.join(small_assets, "data", "train.jsonl"), str(out), device="cpu")
    assert not out.exists()


def test_generated_rows_train_a_seqkd_run_with_the_same_lengths_and_none_is_dropped(tiny_assets, tmp_path):
    """generate_seqkd, then method=seqkd on configs/tiny_cpu.yaml with the config's lengths: every
    written row fits the recipe's budget after the training data encodes its text again (with EOS),
    and the run trains. (Sampled byte tokens that decode to U+FFFD encode to three ids: before the
    fix about half of the tiny teacher's full-length responses were dropped as too long.)"""
    import importlib.util

    from omegaconf import OmegaConf

    spec = importlib.util.spec_from_file_location(  # tests/recipes/conftest.py: the recipe runner
        "recipe_test_helpers", os.path.join(os.path.dirname(__file__), "..", "recipes", "conftest.py"))
    h = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(h)
    TINY_CONFIG, run_recipe = h.TINY_CONFIG, h.run_recipe

    cfg = OmegaConf.load(TINY_CONFIG)
    out = tmp_path / "seqkd.jsonl"
    stats = generate_seqkd(os.path.join(tiny_assets, "teacher"), os.path.join(tiny_assets, "data", "train.jsonl"),
                           str(out), max_prompt_len=int(cfg.max_prompt_len), max_seq_len=int(cfg.max_seq_len),
                           device="cpu")
    assert stats.kept > 0 and stats.get("no_eos") > 0  # responses ran to the budget: the case that overflowed
    recipe, rows = run_recipe(tiny_assets, str(tmp_path / "run"), "method=seqkd", f"seqkd_data={out}")
    assert recipe.train_data.stats.get("dropped_long_response") == 0, recipe.train_data.stats.summary()
    assert recipe.train_data.stats.kept == stats.kept
    assert [r["step"] for r in rows] == [1, 2, 3]
