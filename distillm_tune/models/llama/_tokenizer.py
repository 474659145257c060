"""OpenLLaMA's SentencePiece tokenizer (``tokenizer.model``), with SentencePiece's exact ids.

Why not transformers' tokenizer: transformers 5 only has the ``tokenizers``-converted (fast)
Llama tokenizer, which differs from SentencePiece on text starting with whitespace (it drops the
leading space; OpenLLaMA's model card warns against the fast tokenizer for this reason). The
model was trained on SentencePiece ids, so this wrapper uses SentencePiece itself through
torchtune's ``SentencePieceBaseTokenizer`` and always prepends BOS like the original
``LlamaTokenizer`` (legacy mode) did.

Padding: Llama has no pad token. ``pad_id`` is 0 (``<unk>``), the ``pad_token_id`` of OpenLLaMA's
``generation_config.json`` and the id torchtune's ``generate`` treats as padding. Padded positions
must be masked (labels -100, attention mask), never trained on.
"""

import os
from typing import List, Optional

from torchtune.modules.transforms.tokenizers import SentencePieceBaseTokenizer

TOKENIZER_FILE = "tokenizer.model"
PAD_ID = 0


class OpenLlamaTokenizer:
    """``encode``/``decode`` plus the special ids the recipes need (bos 1, eos 2, pad 0)."""

    def __init__(self, path: str, max_seq_len: Optional[int] = None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"SentencePiece model {path!r} does not exist")
        self._spm = SentencePieceBaseTokenizer(path)
        self.path = path
        self.max_seq_len = max_seq_len
        self.bos_id = self._spm.bos_id
        self.eos_id = self._spm.eos_id
        self.pad_id = PAD_ID
        self.vocab_size = self._spm.vocab_size

    @property
    def stop_tokens(self) -> List[int]:
        """Ids that end generation (torchtune ``generate``'s ``stop_tokens``)."""
        return [self.eos_id]

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> List[int]:
        """SentencePiece ids of ``text`` (BOS prepended by default, EOS on request)."""
        return self._spm.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, ids: List[int]) -> str:
        """Text of ``ids``; BOS/EOS/pad-as-unk are control pieces and decode to nothing."""
        return self._spm.decode([int(i) for i in ids if int(i) != self.pad_id])
