"""CausalLMIO.forward_hidden: the hidden states and output projection it returns give back the
model's own logits, for a tied head (GPT-2), a tied head behind project_out (OPT-350m style) and an
untied head (Llama), tied heads of torchtune's own families (Llama 3.2, Qwen2, Gemma's scaled
embeddings) (the fused loss's CE over them: tests/losses/test_fused.py). Gemma 2's soft-capped
head is refused by the fused path."""

import pytest
import torch
from transformers import (GemmaConfig, GemmaForCausalLM, Gemma2Config, Gemma2ForCausalLM, GPT2Config,
                          GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

from distillm_tune.models import load_hf
from distillm_tune.training.model_io import CausalLMIO, output_projection

VOCAB = 101
MODELS = {
    "gpt2_tied": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2,
                                                    n_head=4)),
    "opt350m_project_out": lambda: OPTForCausalLM(OPTConfig(
        vocab_size=VOCAB, hidden_size=32, word_embed_proj_dim=16, num_hidden_layers=2, ffn_dim=48,
        num_attention_heads=4, max_position_embeddings=32, do_layer_norm_before=False, init_std=0.2)),
    "llama_untied": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)),
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)),
    "qwen2_tied": lambda: Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=True)),
    "gemma_tied": lambda: GemmaForCausalLM(GemmaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=32)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hidden_states_and_head_give_the_models_logits(name, tmp_path):
    torch.manual_seed(0)
    MODELS[name]().save_pretrained(tmp_path)
    model = load_hf(str(tmp_path)).eval()
    io = CausalLMIO(tokenizer=None)
    tokens = torch.randint(0, VOCAB, (3, 9))
    with torch.no_grad():
        logits = io.forward(model, {"tokens": tokens}, torch.device("cpu"))
        hidden, weight, bias = io.forward_hidden(model, {"tokens": tokens}, torch.device("cpu"))
    assert "unembed" not in vars(model)  # the override is gone: the next forward gives logits again
    assert hidden.shape == (3, 9, weight.shape[1]) and weight.shape[0] == logits.shape[-1]
    assert (weight is model.tok_embeddings.weight) == (name != "llama_untied")
    torch.testing.assert_close(torch.nn.functional.linear(hidden, weight, bias), logits, rtol=1e-5, atol=1e-5)
    assert output_projection(model)[0] is weight


def test_fused_path_refuses_soft_capped_head(tmp_path):
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   max_position_embeddings=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        output_projection(load_hf(str(tmp_path)))
