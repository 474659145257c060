import json
import random

import pytest

from distillm_tune.data import (
    InstructionDataset,
    collate_prompt_response,
    format_prompt,
    instruction_dataset,
    load_dolly_rows,
    split_rows,
)

HEAD = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def dolly_rows(n, seed=0):
    rng = random.Random(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    rows = []
    for i in range(n):
        rows.append({
            "instruction": f"task {i}: " + " ".join(rng.choices(words, k=rng.randint(1, 12))),
            "context": " ".join(rng.choices(words, k=rng.randint(0, 8))) if i % 2 else "",
            "response": " ".join(rng.choices(words, k=rng.randint(1, 60))),
            "category": "open_qa",
        })
    return rows


def test_template_exact_with_and_without_input():
    assert format_prompt("Name a color.", "Sky") == (
        HEAD + "### Instruction:\nName a color.\n\n### Input:\nSky\n\n### Response:\n"
    )
    expected = HEAD + "### Instruction:\nName a color.\n\n### Response:\n"
    assert format_prompt("Name a color.") == expected
    assert format_prompt("Name a color.", "") == expected
    assert format_prompt("Name a color.", "  \n") == expected


def test_split_deterministic_disjoint_sizes():
    rows = list(range(100))
    train, valid, test = split_rows(rows, valid_size=10, test_size=7, seed=3)
    assert (len(train), len(valid), len(test)) == (83, 10, 7)
    assert sorted(train + valid + test) == rows
    assert not set(train) & set(valid) and not set(train) & set(test) and not set(valid) & set(test)
    assert split_rows(rows, 10, 7, seed=3) == (train, valid, test)
    assert split_rows(rows, 10, 7, seed=4) != (train, valid, test)
    # pinned: random.Random's shuffle is platform independent, so this must never change
    assert split_rows(list(range(20)), 3, 4, seed=1) == (
        [1, 2, 3, 4, 6, 7, 8, 10, 12, 13, 14, 15, 18], [0, 9, 16], [5, 11, 17, 19]
    )
    with pytest.raises(ValueError, match="exceeds"):
        split_rows(rows, 60, 41)


def test_dataset_splits_are_disjoint_and_sized(tmp_path, char_tok):
    path = write_jsonl(tmp_path / "d.jsonl", dolly_rows(40))
    kw = dict(max_prompt_len=400, max_seq_len=1000, valid_size=5, test_size=6, seed=7)
    parts = {s: InstructionDataset(path, char_tok, split=s, **kw)
             for s in ("train", "valid", "test")}
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [29, 5, 6]
    names = [{ex.instruction for ex in parts[s].examples} for s in parts]
    assert sum(map(len, names)) == 40 and len(set.union(*names)) == 40


def test_tokens_and_budgets(tmp_path, char_tok):
    rows = dolly_rows(60)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    max_prompt_len, max_seq_len = 200, 330
    ds = InstructionDataset(path, char_tok, split="all", max_prompt_len=max_prompt_len,
                            max_seq_len=max_seq_len)
    # independent count of what the rules must drop
    n_long_prompt = n_long_resp = 0
    for r in rows:
        p = 1 + len(format_prompt(r["instruction"], r["context"]))
        if p > max_prompt_len:
            n_long_prompt += 1
        elif p + len(r["response"]) + 1 > max_seq_len:
            n_long_resp += 1
    assert n_long_prompt > 0 and n_long_resp > 0  # the data exercises both rules
    assert ds.stats.get("dropped_long_prompt") == n_long_prompt
    assert ds.stats.get("dropped_long_response") == n_long_resp
    assert len(ds) == ds.stats.kept == 60 - n_long_prompt - n_long_resp
    for sample, ex in zip(ds, ds.examples):
        assert sample["prompt"] == char_tok.encode(format_prompt(ex.instruction, ex.input))
        assert sample["response"] == char_tok.encode(ex.reference, add_bos=False, add_eos=True)
        assert len(sample["prompt"]) <= max_prompt_len
        assert len(sample["prompt"]) + len(sample["response"]) <= max_seq_len
        assert sample["response"][-1] == char_tok.eos_id

    batch = collate_prompt_response([ds[0], ds[1]], pad_id=char_tok.pad_id)
    n0 = len(ds[0]["prompt"])
    n_resp = len(ds[0]["response"])
    assert batch["labels"][0, n0 - 1 : n0 - 1 + n_resp].tolist() == ds[0]["response"]


def test_truncate_response_and_prompt(tmp_path, char_tok):
    rows = dolly_rows(60)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = InstructionDataset(path, char_tok, split="all", max_prompt_len=150, max_seq_len=300,
                            long_prompt="truncate", truncate_response=True)
    assert len(ds) == 60
    assert ds.stats.get("truncated_prompt") > 0 and ds.stats.get("truncated_response") > 0
    n_trunc = 0
    for s in ds:
        assert s["prompt"][0] == char_tok.bos_id and len(s["prompt"]) <= 150
        assert char_tok.decode(s["prompt"]).endswith("### Response:\n")
        assert len(s["prompt"]) + len(s["response"]) <= 300
        if s["response"][-1] != char_tok.eos_id:
            n_trunc += 1
            assert len(s["prompt"]) + len(s["response"]) == 300
    assert n_trunc == ds.stats.get("truncated_response")


def test_bpe_tokenizer_budgets(tmp_path, make_bpe_tok):
    rows = dolly_rows(40)
    tok = make_bpe_tok(
        [format_prompt(r["instruction"], r["context"]) + r["response"] for r in rows])
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    ds = instruction_dataset(tok, path, split="all", max_prompt_len=48, max_seq_len=96)
    assert 0 < len(ds) < 40
    for s in ds:
        assert len(s["prompt"]) <= 48 and len(s["prompt"]) + len(s["response"]) <= 96
        assert s["response"][-1] == tok.eos_id


BAD_ROWS = [
    ({"context": "", "response": "r"}, "missing field 'instruction'"),
    ({"instruction": "i", "context": ""}, "missing field 'response'"),
    ({"instruction": 3, "response": "r"}, "'instruction' must be a string"),
    ({"instruction": "  ", "response": "r"}, "'instruction' is empty"),
    ({"instruction": "i", "response": ""}, "'response' is empty"),
    ({"instruction": "i", "context": ["x"], "response": "r"}, "'context' must be a string"),
    ([1, 2], "expected a JSON object"),
]


@pytest.mark.parametrize("bad,problem", BAD_ROWS)
def test_malformed_row_names_file_and_line(tmp_path, char_tok, bad, problem):
    good = dolly_rows(3)
    path = tmp_path / "d.jsonl"
    # blank line 3 still counts: the bad row is on line 5
    path.write_text(
        json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n\n" + json.dumps(good[2]) + "\n"
        + json.dumps(bad) + "\n", encoding="utf-8",
    )
    with pytest.raises(ValueError) as e:
        InstructionDataset(str(path), char_tok, split="all")
    assert f"{path}:5" in str(e.value) and problem in str(e.value)


def test_invalid_json_and_skip_counts(tmp_path, char_tok):
    good = dolly_rows(4)
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(good[0]), "{not json", json.dumps(good[1]),
             json.dumps({"instruction": "i"}), json.dumps(good[2]), json.dumps(good[3])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"{path}:2: not valid JSON"):
        load_dolly_rows(str(path))
    ds = InstructionDataset(str(path), char_tok, split="all", on_bad_row="skip",
                            max_prompt_len=400, max_seq_len=1000)
    assert ds.stats.get("bad_row") == 2 and ds.stats.rows_read == 6 and len(ds) == 4
    with pytest.raises(ValueError, match="on_bad_row"):
        load_dolly_rows(str(path), on_bad_row="ignore")


def test_json_list_file_and_input_alias(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([
        {"instruction": "a", "input": "ctx", "response": "b"},
        {"instruction": "c", "response": 5},
    ]), encoding="utf-8")
    with pytest.raises(ValueError, match="row 2: field 'response' must be a string"):
        load_dolly_rows(str(path))
    examples, stats = load_dolly_rows(str(path), on_bad_row="skip")
    assert [(e.instruction, e.input, e.references) for e in examples] == [("a", "ctx", ["b"])]
    assert stats.get("bad_row") == 1


def test_datasets_saved_dir(tmp_path, char_tok):
    datasets = pytest.importorskip("datasets")
    rows = dolly_rows(12)
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    ds = InstructionDataset(str(tmp_path / "saved"), char_tok, split="valid", valid_size=3,
                            test_size=2, max_prompt_len=400, max_seq_len=1000)
    direct = InstructionDataset(write_jsonl(tmp_path / "d.jsonl", rows), char_tok, split="valid",
                                valid_size=3, test_size=2, max_prompt_len=400, max_seq_len=1000)
    assert ds.samples == direct.samples and len(ds) == 3


def test_torchtune_config_instantiate(tmp_path, char_tok):
    from omegaconf import OmegaConf
    from torchtune import config

    path = write_jsonl(tmp_path / "d.jsonl", dolly_rows(20))
    cfg = OmegaConf.create({
        "_component_": "distillm_tune.data.instruction_dataset", "source": path, "split": "test",
        "valid_size": 4, "test_size": 4, "max_prompt_len": 400, "max_seq_len": 1000,
    })
    ds = config.instantiate(cfg, char_tok)
    assert isinstance(ds, InstructionDataset) and len(ds) == 4


def test_bad_arguments(tmp_path, char_tok):
    path = write_jsonl(tmp_path / "d.jsonl", dolly_rows(3))
    with pytest.raises(ValueError, match="split"):
        InstructionDataset(path, char_tok, split="dev")
    with pytest.raises(ValueError, match="max_prompt_len < max_seq_len"):
        InstructionDataset(path, char_tok, max_prompt_len=512, max_seq_len=512)
