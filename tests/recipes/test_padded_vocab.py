"""Teacher and student over one tokenizer whose embedding tables are padded to different sizes (as
Qwen2.5 7B's 152064 rows vs 0.5B's 151936): the recipe distils over the tokenizer's ids; a teacher
with another tokenizer of the same size is still refused."""

import json
import os

import pytest
import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM

from conftest import run_recipe  # tests/recipes/conftest.py

LENGTHS = ["max_seq_len=320", "max_prompt_len=256", "sgo.max_new_tokens=8"]


def qwen2_checkpoint(path, rows, tokenizer_text):
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(tokenizer_text, vocab_size=1500, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|im_end|>"], show_progress=False)
    torch.manual_seed(rows)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=rows, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                 tie_word_embeddings=True)).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return tok.get_vocab_size()


def _text(tiny_assets):
    with open(os.path.join(tiny_assets, "data", "train.jsonl")) as f:
        return [json.loads(line)["instruction"] + " " + json.loads(line)["response"] for line in f]


def test_padded_tables_distil_over_the_tokenizer_ids(tiny_assets, tmp_path, one_thread):
    text = _text(tiny_assets)
    n = qwen2_checkpoint(tmp_path / "student", 1600, text)
    assert qwen2_checkpoint(tmp_path / "teacher", 1664, text) == n < 1600
    recipe, rows = run_recipe(tiny_assets, str(tmp_path / "out"), "method=kd",
                              f"student.checkpoint_dir={tmp_path / 'student'}",
                              f"teacher.checkpoint_dir={tmp_path / 'teacher'}", *LENGTHS)
    assert recipe.loss_fn.vocab_size == n
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)


def test_another_tokenizer_of_the_same_size_is_refused(tiny_assets, tmp_path):
    text = _text(tiny_assets)
    qwen2_checkpoint(tmp_path / "student", 1600, text)
    qwen2_checkpoint(tmp_path / "teacher", 1664, [t[::-1] for t in text])  # other merges, other ids
    with pytest.raises(ValueError, match="teacher.checkpoint_dir"):
        run_recipe(tiny_assets, str(tmp_path / "out"), "method=kd", f"student.checkpoint_dir={tmp_path / 'student'}",
                   f"teacher.checkpoint_dir={tmp_path / 'teacher'}", *LENGTHS)
