"""Pretraining text packed into fixed-length blocks, for the LM term of the step loss (spec §1).

Documents are tokenized without BOS and with EOS, so an EOS separates consecutive documents, and
concatenated into one stream. Block ``i`` covers ``stream[i*L : i*L + L + 1]``: ``tokens`` its
first ``L`` tokens and ``labels`` its last ``L`` (``labels[t] == tokens[t + 1]``, already aligned
with the logits as in ``collate_prompt_response``). Blocks overlap by one token so every stream
token after the first is a target exactly once; the tail too short for a full block is dropped.

Sources: a text file with one document per line (blank lines skipped), a ``.jsonl`` file with a
``"text"`` field per line, or a folder whose ``*.txt`` files are one document each.
"""

import json
import logging
import os
from typing import Dict, Iterator, List, Sequence

import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)


def iter_documents(source: str) -> Iterator[str]:
    """Documents of a source (see the module docstring), in a fixed order."""
    source = os.fspath(source)
    if os.path.isdir(source):
        names = sorted(n for n in os.listdir(source) if n.endswith(".txt"))
        if not names:
            raise ValueError(f"{source}: folder holds no .txt files")
        for name in names:
            with open(os.path.join(source, name), encoding="utf-8") as f:
                text = f.read()
            if text.strip():
                yield text
        return
    if not os.path.isfile(source):
        raise ValueError(f"{source}: no such file or folder")
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if source.endswith(".jsonl"):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{source}:{lineno}: not valid JSON ({e})") from None
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise ValueError(f"{source}:{lineno}: expected an object with a string 'text'")
                yield row["text"]
            else:
                yield line.rstrip("\n")


class PackedTextDataset(Dataset):
    """``{"tokens": [L], "labels": [L]}`` blocks of a packed token stream (see module docstring)."""

    def __init__(self, source: str, tokenizer, max_seq_len: int = 512):
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no eos_id; documents need an EOS between them")
        stream: List[int] = []
        n_docs = 0
        for doc in iter_documents(source):
            stream.extend(tokenizer.encode(doc, add_bos=False, add_eos=True))
            n_docs += 1
        self.max_seq_len = max_seq_len
        self.stream = torch.tensor(stream, dtype=torch.long)
        self.num_blocks = max(len(stream) - 1, 0) // max_seq_len
        if self.num_blocks == 0:
            raise ValueError(
                f"{source}: {len(stream)} tokens from {n_docs} documents do not fill one block of "
                f"{max_seq_len} (+1) tokens"
            )
        log.info(
            "pretraining text %s: %d documents, %d tokens, %d blocks of %d (%d tail tokens unused)",
            source, n_docs, len(stream), self.num_blocks, max_seq_len,
            len(stream) - 1 - self.num_blocks * max_seq_len,
        )

    def __len__(self) -> int:
        return self.num_blocks

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        if not -self.num_blocks <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range for {self.num_blocks} blocks")
        i %= self.num_blocks
        start = i * self.max_seq_len
        chunk = self.stream[start : start + self.max_seq_len + 1]
        return {"tokens": chunk[:-1], "labels": chunk[1:]}


def collate_packed(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Stack equal-length blocks into ``tokens`` / ``labels`` ``[B, L]`` (no padding needed)."""
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    return {
        "tokens": torch.stack([torch.as_tensor(s["tokens"]) for s in samples]),
        "labels": torch.stack([torch.as_tensor(s["labels"]) for s in samples]),
    }


def pretrain_dataset(tokenizer, source: str, max_seq_len: int = 512) -> PackedTextDataset:
    """Config entry point (``_component_: distillm_tune.data.pretrain_dataset``)."""
    return PackedTextDataset(source, tokenizer, max_seq_len=max_seq_len)
