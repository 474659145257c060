"""Tiny tokenizers with the project's interface (encode(text, add_bos, add_eos), decode, ids)."""

import pytest


class CharTokenizer:
    """One id per character (ord + 3); pad 0, bos 1 (or none, T5-style), eos 2."""

    def __init__(self, bos: bool = True):
        self.pad_id, self.eos_id = 0, 2
        self.bos_id = 1 if bos else None

    def encode(self, text, add_bos=True, add_eos=False):
        ids = [ord(c) + 3 for c in text]
        if add_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids + [self.eos_id] if add_eos else ids

    def decode(self, ids):
        return "".join(chr(i - 3) for i in ids if i > 2)


class BPETokenizer:
    """A byte-level BPE trained offline on local text with the `tokenizers` library."""

    def __init__(self, texts):
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=800, show_progress=False, special_tokens=["<pad>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        tok.train_from_iterator(texts, trainer)
        self.tok = tok
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    def encode(self, text, add_bos=True, add_eos=False):
        ids = self.tok.encode(text).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids):
        return self.tok.decode([i for i in ids if i > 2])


@pytest.fixture
def char_tok():
    return CharTokenizer()


@pytest.fixture
def char_tok_nobos():
    return CharTokenizer(bos=False)


@pytest.fixture
def make_bpe_tok():
    return BPETokenizer
