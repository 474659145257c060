"""The OPT builder the registry uses for any HF ``config.json`` (the paper's sizes are those configs)."""

from typing import Any, Dict, Optional

from distillm_tune.models._registry import LoRASettings
from distillm_tune.models.modules import LearnedPositionDecoder
from distillm_tune.models.opt._component_builders import _opt


def opt_from_hf_config(config: Dict[str, Any], lora: Optional[LoRASettings] = None) -> LearnedPositionDecoder:
    """Build from an HF OPT ``config.json`` dict (the registry's ``build``).

    Dropout probabilities come from the config (``dropout`` on the residual branches,
    ``attention_dropout`` on attention weights); set them to 0 in the dict to turn dropout off.
    Keys missing from older hub configs take transformers' defaults. Variants no released OPT
    checkpoint uses raise ValueError before anything is built.
    """
    unsupported = {
        "enable_bias": (False, "removes every linear bias"),
        "layer_norm_elementwise_affine": (False, "removes LayerNorm weights"),
        "tie_word_embeddings": (False, "unties the output head"),
    }
    for key, (bad, why) in unsupported.items():
        if config.get(key, not bad) == bad:
            raise ValueError(f"OPT config {key}={bad} is not supported ({why})")
    if config.get("layerdrop", 0.0):
        raise ValueError(f"OPT config layerdrop={config['layerdrop']} is not supported; expected 0")
    pre_norm = config.get("do_layer_norm_before", True)
    kwargs = dict(
        vocab_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        embed_dim=config["hidden_size"],
        intermediate_dim=config["ffn_dim"],
        max_seq_len=config["max_position_embeddings"],
        word_embed_dim=config.get("word_embed_proj_dim") or config["hidden_size"],
        pre_norm=pre_norm,
        final_norm=pre_norm and not config.get("_remove_final_layer_norm", False),
        activation=config.get("activation_function", "relu"),
        attn_dropout=config.get("attention_dropout", 0.0),
        resid_dropout=config.get("dropout", 0.0),
    )
    return _opt(lora=lora, **kwargs)


def opt_real_vocab_size(config: Dict[str, Any]) -> int:
    """Token ids OPT's tokenizer really uses. ``config.json`` does not record it; the released
    checkpoints have 50272 embedding rows for a 50265-token tokenizer, so 50272 -> 50265. Any other
    ``vocab_size`` (e.g. a tiny test model) is taken as fully used."""
    return 50265 if config["vocab_size"] == 50272 else config["vocab_size"]
