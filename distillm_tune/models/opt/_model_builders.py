"""OPT sizes of the paper, and the builder the registry uses for any HF ``config.json``."""

from typing import Any, Dict, List, Optional

from distillm_tune.models._registry import LoRASettings
from distillm_tune.models.modules import LearnedPositionDecoder
from distillm_tune.models.opt._component_builders import _opt, lora_opt, opt

# name: (layers, dim, heads, ffn, word_embed_dim, pre_norm); vocab 50272 rows, 2048 positions.
_SIZES = {
    "125m": (12, 768, 12, 3072, 768, True),
    "350m": (24, 1024, 16, 4096, 512, False),  # post-LN, no final LN, 512 <-> 1024 projections
    "1.3b": (24, 2048, 32, 8192, 2048, True),
    "2.7b": (32, 2560, 32, 10240, 2560, True),  # head_dim 80
}


def _size(name: str) -> Dict[str, Any]:
    layers, dim, heads, ffn, word_dim, pre_norm = _SIZES[name]
    return dict(vocab_size=50272, num_layers=layers, num_heads=heads, embed_dim=dim,
                intermediate_dim=ffn, max_seq_len=2048, word_embed_dim=word_dim, pre_norm=pre_norm)


def opt_125m() -> LearnedPositionDecoder:
    return opt(**_size("125m"))


def opt_350m() -> LearnedPositionDecoder:
    return opt(**_size("350m"))


def opt_1_3b() -> LearnedPositionDecoder:
    return opt(**_size("1.3b"))


def opt_2_7b() -> LearnedPositionDecoder:
    return opt(**_size("2.7b"))


def _lora(name, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
          lora_dropout):
    return lora_opt(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank=lora_rank,
                    lora_alpha=lora_alpha, lora_dropout=lora_dropout, **_size(name))


def lora_opt_125m(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                  apply_lora_to_output: bool = False, lora_rank: int = 8, lora_alpha: float = 16,
                  lora_dropout: float = 0.0) -> LearnedPositionDecoder:
    return _lora("125m", lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank,
                 lora_alpha, lora_dropout)


def lora_opt_350m(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                  apply_lora_to_output: bool = False, lora_rank: int = 8, lora_alpha: float = 16,
                  lora_dropout: float = 0.0) -> LearnedPositionDecoder:
    return _lora("350m", lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank,
                 lora_alpha, lora_dropout)


def lora_opt_1_3b(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                  apply_lora_to_output: bool = False, lora_rank: int = 8, lora_alpha: float = 16,
                  lora_dropout: float = 0.0) -> LearnedPositionDecoder:
    return _lora("1.3b", lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank,
                 lora_alpha, lora_dropout)


def lora_opt_2_7b(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                  apply_lora_to_output: bool = False, lora_rank: int = 8, lora_alpha: float = 16,
                  lora_dropout: float = 0.0) -> LearnedPositionDecoder:
    return _lora("2.7b", lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank,
                 lora_alpha, lora_dropout)


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
