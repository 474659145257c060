"""GPT-2 sizes of the paper, and the builder the registry uses for any HF ``config.json``."""

from typing import Any, Dict, List, Optional

from distillm_tune.models._registry import LoRASettings
from distillm_tune.models.gpt2._component_builders import _gpt2, gpt2, lora_gpt2
from distillm_tune.models.modules import LearnedPositionDecoder

# name: (layers, dim, heads); vocab 50257, 1024 positions, head_dim 64 for all.
_SIZES = {"base": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20), "xl": (48, 1600, 25)}


def _size(name: str) -> Dict[str, int]:
    layers, dim, heads = _SIZES[name]
    return dict(vocab_size=50257, num_layers=layers, num_heads=heads, embed_dim=dim, max_seq_len=1024)


def gpt2_base() -> LearnedPositionDecoder:
    return gpt2(**_size("base"))


def gpt2_medium() -> LearnedPositionDecoder:
    return gpt2(**_size("medium"))


def gpt2_large() -> LearnedPositionDecoder:
    return gpt2(**_size("large"))


def gpt2_xl() -> LearnedPositionDecoder:
    return gpt2(**_size("xl"))


def _lora(name, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank, lora_alpha,
          lora_dropout):
    return lora_gpt2(lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank=lora_rank,
                     lora_alpha=lora_alpha, lora_dropout=lora_dropout, **_size(name))


def lora_gpt2_base(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                   apply_lora_to_output: bool = False, lora_rank: int = 8, lora_alpha: float = 16,
                   lora_dropout: float = 0.0) -> LearnedPositionDecoder:
    return _lora("base", lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank,
                 lora_alpha, lora_dropout)


def lora_gpt2_medium(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                     apply_lora_to_output: bool = False, lora_rank: int = 8, lora_alpha: float = 16,
                     lora_dropout: float = 0.0) -> LearnedPositionDecoder:
    return _lora("medium", lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank,
                 lora_alpha, lora_dropout)


def lora_gpt2_large(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                    apply_lora_to_output: bool = False, lora_rank: int = 8, lora_alpha: float = 16,
                    lora_dropout: float = 0.0) -> LearnedPositionDecoder:
    return _lora("large", lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank,
                 lora_alpha, lora_dropout)


def lora_gpt2_xl(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                 apply_lora_to_output: bool = False, lora_rank: int = 8, lora_alpha: float = 16,
                 lora_dropout: float = 0.0) -> LearnedPositionDecoder:
    return _lora("xl", lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank,
                 lora_alpha, lora_dropout)


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
