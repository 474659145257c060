"""torchtune's own decoder families (models/native.py) against transformers' models of the same
``model_type``: tiny random configs in fp32 covering GQA, Llama 3 rope scaling, qkv biases, tied
and untied heads, Gemma's scaled embeddings and Gemma 2's soft-capping and sliding window.

Each case: padded-batch logits within 1e-5, KV-cached decoding equal to the full forward, torchtune's
KV-cached greedy ``generate`` equal to transformers' token for token, HF -> ours -> HF through
``load_hf``/``save_hf`` reloading in ``AutoModelForCausalLM`` with identical logits, and LoRA's
merged export and PEFT adapter giving the LoRA model's logits in transformers/peft.
"""

import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from distillm_tune.models import LoRASettings, family_for, load_hf, save_hf
from distillm_tune.models.native import FAMILIES

from decoder_parity import DecoderPort, hf_logits, max_diff  # this folder: pytest puts it on sys.path

VOCAB = 101
PAD = 0
# initializer_range 0.2: logits of order 1, so a 1e-5 tolerance means something
_SMALL = dict(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=48,
              vocab_size=VOCAB, initializer_range=0.2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)

CASES = {
    "llama_gqa_untied": (LlamaForCausalLM, lambda: LlamaConfig(
        **_SMALL, num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
    # Llama 3.1/3.2: rope_type llama3 (the factor changes the low frequencies), tied like 3.2 1B
    "llama3_scaled_tied": (LlamaForCausalLM, lambda: LlamaConfig(
        **_SMALL, num_key_value_heads=1, max_position_embeddings=16384, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "mistral_gqa": (MistralForCausalLM, lambda: MistralConfig(
        **_SMALL, num_key_value_heads=2, max_position_embeddings=64, sliding_window=None,
        tie_word_embeddings=False)),
    "qwen2_tied": (Qwen2ForCausalLM, lambda: Qwen2Config(
        **_SMALL, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)),
    "qwen2_untied": (Qwen2ForCausalLM, lambda: Qwen2Config(
        **_SMALL, num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=False)),
    "phi3_gqa": (Phi3ForCausalLM, lambda: Phi3Config(
        **_SMALL, num_key_value_heads=2, max_position_embeddings=64, original_max_position_embeddings=64,
        tie_word_embeddings=False)),
    # head_dim 16 with 4 heads over hidden 32: Gemma's head_dim is its own key
    "gemma_mqa": (GemmaForCausalLM, lambda: GemmaConfig(
        **_SMALL, num_key_value_heads=1, head_dim=16, max_position_embeddings=64)),
    "gemma2_softcap": (Gemma2ForCausalLM, lambda: Gemma2Config(
        **_SMALL, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=16,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=24)),
}


def port(case):
    hf_cls, make = CASES[case]
    config = make()
    return DecoderPort(case, family_for(config.model_type), hf_cls, VOCAB, norm_name="norm"), config


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    p, config = port(request.param)
    hf_model = p.random_hf_model(config)
    saved = tmp_path_factory.mktemp(request.param)
    hf_model.save_pretrained(saved)
    return p, config, hf_model, saved


def test_ten_families_registered():
    for model_type in ("llama", "mistral", "qwen2", "phi3", "gemma", "gemma2"):
        assert family_for(model_type) is FAMILIES[model_type]


def test_logits_match_transformers(case):
    p, config, hf_model, saved = case
    p.check_logits_match_hf(hf_model, p.load_saved(config, saved), p.name)


def test_kv_cache_decoding_matches_full_forward(case):
    p, config, hf_model, saved = case
    p.check_kv_cache_decoding(config, hf_model, saved, p.load_saved(config, saved))


def test_torchtune_generate_matches_transformers_greedy(case):
    p, config, hf_model, saved = case
    p.check_generate_matches_greedy(config, hf_model, saved, pad=PAD)


def test_load_hf_save_hf_reloads_in_transformers(case, tmp_path):
    """HF -> load_hf -> save_hf -> AutoModelForCausalLM: identical logits, tied heads stay tied."""
    p, config, hf_model, saved = case
    model = load_hf(saved).eval()
    p.check_logits_match_hf(hf_model, model, p.name + " via load_hf")
    save_hf(model, tmp_path / "out", saved)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert all(not v for v in info.values()), info
    tokens, real, pos, _ = p.padded_batch()
    assert max_diff(hf_logits(reloaded.eval(), tokens, real, pos), hf_logits(hf_model, tokens, real, pos), real) == 0
    if config.tie_word_embeddings:
        assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()


LORA_CASES = [
    LoRASettings(("q_proj", "k_proj", "v_proj", "output_proj"), apply_lora_to_mlp=True, lora_rank=4, lora_alpha=8.0),
    LoRASettings(("q_proj", "v_proj"), lora_rank=2, lora_alpha=3.0),
    LoRASettings(("k_proj",), lora_rank=3, lora_alpha=5.0),
    LoRASettings(("v_proj",), apply_lora_to_output=True, lora_rank=2, lora_alpha=4.0),
]


@pytest.mark.usefixtures("peft_without_torchao")
@pytest.mark.parametrize("lora", LORA_CASES, ids=["qkvo_mlp", "qv", "k", "v_output"])
def test_lora_merge_and_peft_export(case, lora, tmp_path):
    p, config, _, saved = case
    if lora.apply_lora_to_output and config.tie_word_embeddings:
        with pytest.raises(ValueError, match="apply_lora_to_output"):
            p.family.build(config.to_dict(), lora)
        return
    p.check_lora_merge_and_peft_export(config, saved, lora, tmp_path)


REFUSALS = [
    ("phi3_gqa", dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}),
     "rope_type"),
    ("phi3_gqa", dict(partial_rotary_factor=0.5), "partial_rotary_factor"),
    ("qwen2_tied", dict(use_sliding_window=True), "use_sliding_window"),
    ("gemma_mqa", dict(tie_word_embeddings=False), "tie_word_embeddings"),
    ("gemma2_softcap", dict(final_logit_softcapping=None), "final_logit_softcapping"),
    ("gemma2_softcap", dict(layer_types=["full_attention", "full_attention"]), "layer_types"),
    ("mistral_gqa", dict(head_dim=16), "head_dim"),
    ("llama_gqa_untied", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope_type"),
]


@pytest.mark.parametrize("case,change,key", REFUSALS, ids=[f"{c}-{k}" for c, _, k in REFUSALS])
def test_what_torchtune_cannot_express_is_refused_naming_the_key(case, change, key, tmp_path):
    """Before any weight is read: load_hf builds on the meta device first."""
    p, config = port(case)
    p.random_hf_model(config).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    with pytest.raises(ValueError, match=key):
        load_hf(tmp_path)


def test_gemma2_is_built_for_sequences_up_to_its_window():
    """torchtune's KV-cached sliding-window mask is wrong past the window: no longer sequences."""
    _, config = port("gemma2_softcap")
    with torch.device("meta"):
        model = family_for("gemma2").build({**config.to_dict(), "sliding_window": 8})
    assert model.max_seq_len == 8
