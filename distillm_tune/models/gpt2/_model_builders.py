"""The GPT-2 builder the registry uses for any HF ``config.json`` (the paper's sizes are those configs)."""

from typing import Any, Dict, Optional

from distillm_tune.models._registry import LoRASettings
from distillm_tune.models.gpt2._component_builders import _gpt2
from distillm_tune.models.modules import LearnedPositionDecoder

def gpt2_from_hf_config(config: Dict[str, Any], lora: Optional[LoRASettings] = None) -> LearnedPositionDecoder:
    """Build from an HF GPT-2 ``config.json`` dict (the registry's ``build``).

    Dropout probabilities come from the config (``attn_pdrop``, ``resid_pdrop``, ``embd_pdrop``)
    so a model in train mode behaves as transformers' would; set them to 0 in the dict to turn
    dropout off. Variants this port does not implement raise ValueError before anything is built.
    """
    unsupported = {
        "scale_attn_by_inverse_layer_idx": (True, "divides attention scores by layer_idx + 1"),
        "scale_attn_weights": (False, "disables the 1/sqrt(head_dim) attention scale"),
        "add_cross_attention": (True, "adds cross-attention blocks"),
        "tie_word_embeddings": (False, "unties the output head"),
    }
    for key, (bad, why) in unsupported.items():
        if config.get(key, not bad) == bad:
            raise ValueError(f"GPT-2 config {key}={bad} is not supported ({why}); only the "
                             f"released GPT-2 variant is ported")
    kwargs = dict(
        vocab_size=config["vocab_size"],
        num_layers=config["n_layer"],
        num_heads=config["n_head"],
        embed_dim=config["n_embd"],
        max_seq_len=config["n_positions"],
        intermediate_dim=config.get("n_inner"),
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        activation=config.get("activation_function", "gelu_new"),
        attn_dropout=config.get("attn_pdrop", 0.0),
        resid_dropout=config.get("resid_pdrop", 0.0),
        embed_dropout=config.get("embd_pdrop", 0.0),
    )
    return _gpt2(lora=lora, **kwargs)
