"""T5 / mT5 tokenizer over ``spiece.model`` with the ids of transformers' ``T5Tokenizer``.

Layout (checked in the test against transformers 5): SentencePiece unigram ids, pad 0, eos 1,
unk 2, no BOS, EOS appended; 100 sentinels on top, ``<extra_id_i>`` = sp_size + 99 - i. Like HF,
the special strings ("<pad>", "</s>", "<unk>", "<extra_id_i>") in text become their ids and the
text between them is encoded piece by piece. ``decode`` follows HF's Metaspace decoder: pieces
joined, "▁" -> " ", the first piece's leading space dropped; unk decodes as "<unk>" (SentencePiece
would print " ⁇ "), and ids outside the vocabulary (padded embedding rows) are dropped.
"""

import os
import re
from typing import List, Optional

from sentencepiece import SentencePieceProcessor

_T5_LAYOUT = {"pad": (0, "<pad>"), "eos": (1, "</s>"), "unk": (2, "<unk>")}


class T5Tokenizer:
    def __init__(self, path: str, extra_ids: int = 100, max_seq_len: Optional[int] = None):
        self._sp = SentencePieceProcessor(model_file=path)
        self.sp_size = self._sp.get_piece_size()
        for name, (idx, piece) in _T5_LAYOUT.items():
            if idx >= self.sp_size or self._sp.id_to_piece(idx) != piece:
                raise ValueError(f"{path}: id {idx} should be {piece!r} ({name}) in a T5 SentencePiece model")
        self.pad_id, self.eos_id, self.unk_id, self.bos_id = 0, 1, 2, None
        self.vocab_size = self.sp_size + extra_ids
        self.max_seq_len = max_seq_len
        specials = {piece: idx for idx, piece in _T5_LAYOUT.values()}
        specials.update({f"<extra_id_{i}>": self.sp_size + extra_ids - 1 - i for i in range(extra_ids)})
        self._special_ids = specials
        self._special_pieces = {idx: piece for piece, idx in specials.items()}
        alternation = "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True))
        self._special_re = re.compile(f"({alternation})")

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = True) -> List[int]:
        """Token ids; ``add_bos`` is accepted for the decoder-only interface and ignored (T5 has no
        BOS). Past ``max_seq_len`` the ids are cut and EOS kept last, as HF's truncation does."""
        ids: List[int] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2:  # odd parts are the matched special strings
                ids.append(self._special_ids[part])
            elif part:
                ids.extend(self._sp.encode(part))
        if self.max_seq_len is not None and len(ids) + add_eos > self.max_seq_len:
            ids = ids[: self.max_seq_len - add_eos]
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids: List[int], skip_special_tokens: bool = True) -> str:
        pieces = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                continue
            special = self._special_pieces.get(i)
            if special is not None:
                if not skip_special_tokens:
                    pieces.append(special)
            else:
                pieces.append(self._sp.id_to_piece(i))
        text = "".join(pieces).replace("\u2581", " ")
        return text[1:] if pieces and pieces[0].startswith("\u2581") else text


def load_t5_tokenizer(checkpoint_dir: str, max_seq_len: Optional[int] = None, extra_ids: int = 100) -> T5Tokenizer:
    """Registry entry: ``<checkpoint_dir>/spiece.model`` (a path to the file itself also works)."""
    path = checkpoint_dir if os.path.isfile(checkpoint_dir) else os.path.join(checkpoint_dir, "spiece.model")
    if not os.path.isfile(path):
        raise ValueError(f"no SentencePiece model at {path}; T5/mT5 checkpoints ship spiece.model")
    return T5Tokenizer(path, extra_ids=extra_ids, max_seq_len=max_seq_len)
