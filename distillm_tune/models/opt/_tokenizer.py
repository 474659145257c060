"""OPT tokenizer: GPT-2's byte-level BPE merges with OPT's own vocabulary ids.

``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3; transformers prepends ``</s>`` as BOS
(``add_bos_token=True``), which ``encode`` does by default too. GPT-2 and OPT ids are NOT
interchangeable, which is why this is a separate class reading the checkpoint's own files.
"""

from typing import Optional

from distillm_tune.models.gpt2._tokenizer import GPT2Tokenizer


class OPTTokenizer(GPT2Tokenizer):
    """OPT ids, identical to transformers' tokenizer for OPT checkpoints; ``pad_id`` is 1."""

    default_special = {"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>",
                       "pad_token": "<pad>"}
    add_bos_default = True


def opt_tokenizer(checkpoint_dir: str, max_seq_len: Optional[int] = None) -> OPTTokenizer:
    """The registry's ``load_tokenizer`` for OPT."""
    return OPTTokenizer.from_dir(checkpoint_dir, max_seq_len)
