"""The tokenizer of any checkpoint that ships ``tokenizer.json``, with transformers' ids.

``tokenizer.json`` is the whole pipeline (normaliser, pre-tokeniser, model, post-processor) that
transformers' fast tokenizers run; the ``tokenizers`` library runs the same Rust code here, so ids
equal ``AutoTokenizer``'s. What ``tokenizer.json`` does not say comes from the files transformers
reads it from:

- special tokens (``bos_token``, ``eos_token``, ``pad_token``) from ``tokenizer_config.json`` /
  ``special_tokens_map.json``;
- whether a BOS is prepended: ``add_bos_token`` in ``tokenizer_config.json`` when it says so,
  else what the post-processor of ``tokenizer.json`` does (Llama 3 adds ``<|begin_of_text|>``,
  SmolLM2 and Qwen2 add nothing: their ``bos_token`` is never prepended);
- stop ids: the EOS plus every ``eos_token_id`` of ``generation_config.json`` (Llama 3 Instruct's
  ``<|eot_id|>`` and ``<|eom_id|>``, ...);
- the pad id: ``pad_token``, else ``generation_config.json``'s ``pad_token_id``, else the EOS
  (padded positions are always masked).

Checkpoints with only a SentencePiece model (OpenLLaMA's ``tokenizer.model``) keep the exact
SentencePiece ids (``llama/_tokenizer.py``).
"""

import os
from typing import Any, Dict, List, Optional

from tokenizers import Tokenizer

from distillm_tune.models.gpt2._tokenizer import _content, _read_json

TOKENIZER_JSON = "tokenizer.json"
SENTENCEPIECE = "tokenizer.model"


class HFTokenizer:
    """``encode``/``decode``, ``bos_id``/``eos_id``/``pad_id``/``stop_tokens`` over a
    ``tokenizer.json``.

    ``encode(text, add_bos=True)`` prepends BOS only if this checkpoint's tokenizer adds one
    (``adds_bos``): the recipes ask for "the model's start of text", and a chat model whose
    ``bos_token`` is ``<|im_start|>`` must not get one before every prompt.
    """

    def __init__(self, checkpoint_dir: str, max_seq_len: Optional[int] = None):
        self.path = os.path.join(checkpoint_dir, TOKENIZER_JSON)
        self.checkpoint_dir, self._hf = checkpoint_dir, None  # transformers' tokenizer, for chat templates
        self.tokenizer = Tokenizer.from_file(self.path)
        self.max_seq_len = max_seq_len
        config = {**_read_json(os.path.join(checkpoint_dir, "special_tokens_map.json")),
                  **_read_json(os.path.join(checkpoint_dir, "tokenizer_config.json"))}
        generation = _read_json(os.path.join(checkpoint_dir, "generation_config.json"))
        model_config = _read_json(os.path.join(checkpoint_dir, "config.json"))
        self.bos_id = self._special(config, "bos_token", generation, model_config)
        self.eos_id = self._special(config, "eos_token", generation, model_config)
        if self.eos_id is None:
            raise ValueError(f"{checkpoint_dir!r}: no eos_token in tokenizer_config.json / "
                             "special_tokens_map.json and no eos_token_id in generation_config.json "
                             "or config.json; generation needs an end-of-sequence id")
        pad = self._special(config, "pad_token", generation, model_config)
        self.pad_id = self.eos_id if pad is None else pad
        eos_ids = generation.get("eos_token_id", model_config.get("eos_token_id"))
        eos_ids = eos_ids if isinstance(eos_ids, list) else [eos_ids]
        self.stop_tokens = sorted({self.eos_id, *(int(i) for i in eos_ids if i is not None)})
        self.adds_bos = self._adds(config, "add_bos_token", first=True)
        self.adds_eos = self._adds(config, "add_eos_token", first=False)

    def _special(self, config: Dict[str, Any], name: str, generation: Dict[str, Any],
                 model_config: Dict[str, Any]) -> Optional[int]:
        """Id of ``name`` (e.g. "eos_token") from the tokenizer config, else ``<name>_id`` of
        generation_config.json / config.json (the first, if a list)."""
        token = _content(config.get(name))
        if token:
            idx = self.tokenizer.token_to_id(token)
            if idx is None:
                raise ValueError(f"{name} {token!r} of tokenizer_config.json is not in {self.path}")
            return idx
        idx = generation.get(f"{name}_id", model_config.get(f"{name}_id"))
        idx = idx[0] if isinstance(idx, list) else idx
        return None if idx is None else int(idx)

    def _adds(self, config: Dict[str, Any], key: str, first: bool) -> bool:
        """Whether transformers would add BOS (``first``) / EOS: the tokenizer config's flag when
        present (transformers' Llama/Gemma tokenizers rebuild the post-processor from it), else
        what tokenizer.json's post-processor does to a probe text."""
        special = self.bos_id if first else self.eos_id
        if special is None:
            return False
        if config.get(key) is not None:
            return bool(config[key])
        probe = "a"
        with_special = self.tokenizer.encode(probe, add_special_tokens=True).ids
        plain = self.tokenizer.encode(probe, add_special_tokens=False).ids
        if len(with_special) <= len(plain):
            return False
        return (with_special[0] if first else with_special[-1]) == special

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> List[int]:
        """Ids of ``text`` as transformers' tokenizer gives them, with this checkpoint's BOS if
        ``add_bos`` and it has one that it adds, and EOS if ``add_eos``."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_bos and self.adds_bos:
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: List[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: List[Dict[str, str]], add_generation_prompt: bool) -> str:
        """``messages`` rendered as text with the checkpoint's own chat template, by transformers'
        ``apply_chat_template`` (the Jinja environment and template variables it defines)."""
        if self._hf is None:
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(self.checkpoint_dir)
            if not self._hf.chat_template:
                raise ValueError(f"{self.checkpoint_dir!r} has no chat template (looked for chat_template "
                                 "in tokenizer_config.json and chat_template.jinja); use dataset.template: paper")
        return self._hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def load_checkpoint_tokenizer(checkpoint_dir: str, max_seq_len: Optional[int] = None):
    """``tokenizer.json`` if the checkpoint has one, else its SentencePiece ``tokenizer.model``;
    a ``FileNotFoundError`` naming the directory and both files otherwise."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if os.path.isfile(os.path.join(checkpoint_dir, TOKENIZER_JSON)):
        return HFTokenizer(checkpoint_dir, max_seq_len)
    if os.path.isfile(os.path.join(checkpoint_dir, SENTENCEPIECE)):
        from distillm_tune.models.llama import OpenLlamaTokenizer

        return OpenLlamaTokenizer(os.path.join(checkpoint_dir, SENTENCEPIECE), max_seq_len)
    raise FileNotFoundError(
        f"no tokenizer in checkpoint directory {checkpoint_dir!r}: looked for {TOKENIZER_JSON} "
        f"and {SENTENCEPIECE}; copy the tokenizer files of the model into it"
    )


def stop_ids(tokenizer) -> List[int]:
    """Every id that ends a generation: the tokenizer's ``stop_tokens`` (all of a checkpoint's
    end-of-turn ids), else its EOS."""
    return list(getattr(tokenizer, "stop_tokens", None) or [tokenizer.eos_id])


def cut_at_stop(ids: List[int], stops: List[int]) -> List[int]:
    """``ids`` up to (without) the first stop id."""
    cut = [i for i, t in enumerate(ids) if t in set(stops)]
    return list(ids[: cut[0]]) if cut else list(ids)
