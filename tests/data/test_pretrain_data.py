import json

import pytest
import torch

from distillm_tune.data import PackedTextDataset, collate_packed, pretrain_dataset

DOCS = [f"document number {i} " + "words " * (i % 7) for i in range(30)]


def stream_of(tok, docs):
    out = []
    for d in docs:
        out += tok.encode(d, add_bos=False, add_eos=True)
    return out


def test_blocks_exact_reproduce_stream_and_shift(tmp_path, char_tok):
    path = tmp_path / "c.txt"
    path.write_text("\n".join(DOCS[:10]) + "\n\n" + "\n".join(DOCS[10:]) + "\n", encoding="utf-8")
    L = 37
    ds = PackedTextDataset(str(path), char_tok, max_seq_len=L)
    stream = stream_of(char_tok, DOCS)
    assert len(ds) == (len(stream) - 1) // L
    blocks = [ds[i] for i in range(len(ds))]
    assert all(b["tokens"].shape == (L,) and b["labels"].shape == (L,) for b in blocks)
    assert torch.cat([b["tokens"] for b in blocks]).tolist() == stream[: len(ds) * L]
    assert torch.cat([b["labels"] for b in blocks]).tolist() == stream[1 : len(ds) * L + 1]
    for b in blocks:
        assert b["labels"][:-1].tolist() == b["tokens"][1:].tolist()
    # documents are separated by EOS
    assert stream.count(char_tok.eos_id) == len(DOCS)
    assert ds[-1]["tokens"].tolist() == blocks[-1]["tokens"].tolist()
    with pytest.raises(IndexError):
        ds[len(ds)]

    batch = collate_packed(blocks[:3])
    assert batch["tokens"].shape == batch["labels"].shape == (3, L)
    assert batch["tokens"].dtype == torch.long


def test_jsonl_and_folder_sources(tmp_path, char_tok):
    jl = tmp_path / "c.jsonl"
    jl.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS), encoding="utf-8")
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(DOCS):
        (folder / f"{i:03d}.txt").write_text(d, encoding="utf-8")
    (folder / "ignored.md").write_text("not a document", encoding="utf-8")
    a = pretrain_dataset(char_tok, str(jl), max_seq_len=16)
    b = pretrain_dataset(char_tok, str(folder), max_seq_len=16)
    assert a.stream.tolist() == b.stream.tolist() == stream_of(char_tok, DOCS)

    jl.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"txt": "b"}) + "\n")
    with pytest.raises(ValueError, match=f"{jl}:2"):
        PackedTextDataset(str(jl), char_tok, max_seq_len=4)


def test_too_short_corpus(tmp_path, char_tok):
    path = tmp_path / "c.txt"
    path.write_text("abc\n", encoding="utf-8")  # 4 tokens with EOS: needs max_seq_len + 1
    assert len(PackedTextDataset(str(path), char_tok, max_seq_len=3)) == 1
    with pytest.raises(ValueError, match="do not fill one block"):
        PackedTextDataset(str(path), char_tok, max_seq_len=4)
