"""Byte-level BPE tokenizer for GPT-2 (and, by subclassing, OPT) over the ``tokenizers`` library.

Why not torchtune's ``GPT2BaseTokenizer``: it BPE-splits special tokens, drops merges lines and
its ``decode`` returns pieces (MODEL_PORTS.md). This wrapper runs the same Rust tokenizer that
transformers' ``GPT2Tokenizer`` runs, so ids equal transformers' for the same files.

Files read from a checkpoint directory: ``tokenizer.json`` if present, else ``vocab.json`` +
``merges.txt`` built the way transformers builds them (BPE with no unk fusing, byte-level
pre-tokenizer without prefix space, byte-level decoder). Special-token strings come from
``tokenizer_config.json`` / ``special_tokens_map.json`` when present, else the family defaults;
so does ``add_bos_token`` (whether ``encode`` prepends BOS by default).
"""

import json
import os
from typing import Any, Dict, List, Optional

from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE


def _content(token: Any) -> Optional[str]:
    """``"x"`` or ``{"content": "x", ...}`` (both occur in tokenizer configs) -> ``"x"``."""
    return token.get("content") if isinstance(token, dict) else token


def _read_json(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_bpe(checkpoint_dir: str, special_tokens: List[str]) -> Tokenizer:
    """``tokenizer.json``, or ``vocab.json`` + ``merges.txt`` with ``special_tokens`` registered as
    special (matched whole in text, never BPE-split), as transformers does."""
    path = os.path.join(checkpoint_dir, "tokenizer.json")
    if os.path.isfile(path):
        return Tokenizer.from_file(path)
    vocab, merges = (os.path.join(checkpoint_dir, f) for f in ("vocab.json", "merges.txt"))
    if not (os.path.isfile(vocab) and os.path.isfile(merges)):
        raise ValueError(f"{checkpoint_dir!r} has neither tokenizer.json nor vocab.json + merges.txt")
    tok = Tokenizer(BPE.from_file(vocab, merges, dropout=None, continuing_subword_prefix="",
                                  end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in dict.fromkeys(special_tokens)])
    return tok


class GPT2Tokenizer:
    """GPT-2 ids, identical to transformers' ``GPT2Tokenizer`` / ``GPT2TokenizerFast``.

    ``encode`` adds nothing by default, like transformers for GPT-2; ``add_bos``/``add_eos``
    prepend/append ``<|endoftext|>``. GPT-2 has no pad token: ``pad_id`` is ``eos_id``.
    """

    default_special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                       "unk_token": "<|endoftext|>", "pad_token": None}
    add_bos_default = False

    def __init__(self, tokenizer: Tokenizer, special: Dict[str, Optional[str]],
                 max_seq_len: Optional[int] = None, add_bos_default: Optional[bool] = None) -> None:
        self.tokenizer = tokenizer
        if add_bos_default is not None:
            self.add_bos_default = add_bos_default
        self.max_seq_len = max_seq_len
        self.bos_id = self._id(special["bos_token"])
        self.eos_id = self._id(special["eos_token"])
        self.pad_id = self._id(special["pad_token"]) if special.get("pad_token") else self.eos_id

    def _id(self, token: str) -> int:
        idx = self.tokenizer.token_to_id(token)
        if idx is None:
            raise ValueError(f"special token {token!r} is not in the tokenizer's vocabulary")
        return idx

    @classmethod
    def from_dir(cls, checkpoint_dir: str, max_seq_len: Optional[int] = None) -> "GPT2Tokenizer":
        config = {**_read_json(os.path.join(checkpoint_dir, "special_tokens_map.json")),
                  **_read_json(os.path.join(checkpoint_dir, "tokenizer_config.json"))}
        special = {k: _content(config.get(k, v)) for k, v in cls.default_special.items()}
        added = [_content(t) for t in config.get("added_tokens_decoder", {}).values()]
        names = [t for t in special.values() if t] + added
        return cls(load_bpe(checkpoint_dir, names), special, max_seq_len,
                   config.get("add_bos_token", cls.add_bos_default))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: Optional[bool] = None, add_eos: bool = False) -> List[int]:
        """Token ids of ``text``; ``add_bos=None`` means the family default (as transformers)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos_default if add_bos is None else add_bos:
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: List[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids``; keeps special tokens by default, as transformers' ``decode``."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def gpt2_tokenizer(checkpoint_dir: str, max_seq_len: Optional[int] = None) -> GPT2Tokenizer:
    """The registry's ``load_tokenizer`` for GPT-2."""
    return GPT2Tokenizer.from_dir(checkpoint_dir, max_seq_len)
