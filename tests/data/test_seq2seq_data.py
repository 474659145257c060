import json

import pytest
import torch

from distillm_tune.data import Seq2SeqDataset, collate_seq2seq, seq2seq_dataset


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_samsum_samples_and_budgets(tmp_path, char_tok_nobos):
    tok = char_tok_nobos
    rows = [{"dialogue": "A: hi\nB: hello " * k, "summary": "greeting " * k, "id": str(k)}
            for k in range(1, 9)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    ds = Seq2SeqDataset(path, tok, task="samsum", max_source_len=60, max_target_len=40)
    for s, src_text, tgt_text in zip(ds, ds.source_texts, ds.target_texts):
        assert s["source"][-1] == tok.eos_id and s["target"][-1] == tok.eos_id
        assert len(s["source"]) <= 60 and len(s["target"]) <= 40
        assert s["target"] == tok.encode(tgt_text, add_bos=False, add_eos=True)
        full = tok.encode("summarize: " + src_text, add_bos=False, add_eos=True)
        assert s["source"] == (full if len(full) <= 60 else full[:59] + [tok.eos_id])
    n_long = sum(len(r["summary"]) + 1 > 40 for r in rows)
    assert ds.stats.get("dropped_long_target") == n_long and len(ds) == 8 - n_long
    assert ds.stats.get("truncated_source") > 0

    kept = Seq2SeqDataset(path, tok, max_source_len=60, max_target_len=40, truncate_target=True,
                          source_prefix="")
    assert len(kept) == 8 and kept.stats.get("truncated_target") == n_long
    assert kept[0]["source"] == tok.encode(rows[0]["dialogue"], add_bos=False, add_eos=True)


def test_iwslt_both_row_forms_and_bad_rows(tmp_path, char_tok_nobos):
    rows = [{"en": "Hello.", "de": "Hallo."}, {"translation": {"en": "Thanks.", "de": "Danke."}}]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    ds = seq2seq_dataset(char_tok_nobos, path, task="iwslt")
    assert ds.source_texts == ["Hello.", "Thanks."] and ds.target_texts == ["Hallo.", "Danke."]
    assert char_tok_nobos.decode(ds[0]["source"]) == "translate English to German: Hello."
    rev = seq2seq_dataset(char_tok_nobos, path, task="iwslt", src_lang="de", tgt_lang="en")
    assert char_tok_nobos.decode(rev[1]["source"]) == "translate German to English: Danke."

    path = write_jsonl(tmp_path / "bad.jsonl", rows + [{"translation": {"en": "x"}}])
    with pytest.raises(ValueError, match=f"{path}:3: missing field 'de'"):
        seq2seq_dataset(char_tok_nobos, path, task="iwslt")
    assert len(seq2seq_dataset(char_tok_nobos, path, task="iwslt", on_bad_row="skip")) == 2
    with pytest.raises(ValueError, match="task"):
        seq2seq_dataset(char_tok_nobos, path, task="xsum")


def test_collate_seq2seq():
    samples = [{"source": [5, 6, 7, 1], "target": [8, 9, 1]},
               {"source": [4, 1], "target": [3, 3, 3, 3, 1]}]
    b = collate_seq2seq(samples, pad_id=0, decoder_start_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 1], [4, 1, 0, 0]]
    assert b["encoder_padding_mask"].tolist() == [[True] * 4, [True, True, False, False]]
    assert b["labels"].tolist() == [[8, 9, 1, -100, -100], [3, 3, 3, 3, 1]]
    assert b["decoder_input_ids"].tolist() == [[0, 8, 9, 0, 0], [0, 3, 3, 3, 3]]
    # decoder input = start token + labels shifted right, on every real target position
    real = b["labels"] != -100
    shifted = torch.cat([torch.zeros(2, 1, dtype=torch.long), b["labels"][:, :-1]], dim=1)
    assert torch.equal(b["decoder_input_ids"][real], shifted[real])
    assert b["sources"] == [[5, 6, 7, 1], [4, 1]]
    b = collate_seq2seq(samples, pad_id=9, decoder_start_id=7, ignore_index=-1)
    assert b["decoder_input_ids"][:, 0].tolist() == [7, 7] and b["labels"][0, -1] == -1
    with pytest.raises(ValueError):
        collate_seq2seq([], pad_id=0)
