"""make_student: the layer-subset student loads in transformers and in load_hf, and equals the
teacher's transformers model with the other blocks removed by hand."""

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from distillm_tune.models import load_hf
from distillm_tune.scripts.make_student import main, make_student, parse_layers

TEACHERS = {
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=5, n_head=4)),
}


def blocks(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


@pytest.mark.parametrize("name", sorted(TEACHERS))
def test_student_equals_teacher_with_blocks_removed(name, tmp_path):
    torch.manual_seed(0)
    teacher = TEACHERS[name]().eval()
    teacher.save_pretrained(tmp_path / "teacher")
    (tmp_path / "teacher" / "tokenizer.json").write_text("{}")  # side files travel with the student
    main(["--teacher", str(tmp_path / "teacher"), "--layers", "0,2,4", "--out", str(tmp_path / "student")])

    reference = copy.deepcopy(teacher)
    kept = [blocks(teacher)[i] for i in (0, 2, 4)]
    if hasattr(reference, "model"):
        reference.model.layers = torch.nn.ModuleList(kept)
        for i, layer in enumerate(kept):
            layer.self_attn.layer_idx = i
    else:
        reference.transformer.h = torch.nn.ModuleList(kept)
    reference.config.num_hidden_layers = 3

    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student").eval()
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        want = reference(tokens, use_cache=False).logits
        # the same transformers code on the same weights; compared within fp32 rounding all the same
        torch.testing.assert_close(student(tokens, use_cache=False).logits, want)
        ours = load_hf(tmp_path / "student").eval()(tokens)
    assert (ours - want).abs().max().item() < 1e-5
    assert (tmp_path / "student" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "student" / "config.json").read_text())[
        "n_layer" if name == "gpt2" else "num_hidden_layers"] == 3


def test_bad_layer_lists_are_named(tmp_path):
    LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4)).save_pretrained(tmp_path / "t")
    with pytest.raises(ValueError, match=r"layers 0\.\.1 \(num_hidden_layers=2\)"):
        make_student(str(tmp_path / "t"), [0, 2], str(tmp_path / "s"))
    for bad in ("2,1", "0,0", "a,b", ""):
        with pytest.raises(ValueError, match="--layers"):
            parse_layers(bad)
