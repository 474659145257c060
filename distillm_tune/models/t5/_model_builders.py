"""Named T5 v1.1 / mT5 sizes, their LoRA variants, and ``build`` from an HF ``config.json``.

Sizes (layers per stack x d_model x heads, d_ff; d_kv 64): small 8x512x6 (1024), base 12x768x12
(2048), large 24x1024x16 (2816), xl 24x2048x32 (5120). Vocab: 32128 (T5), 250112 (mT5) embedding
rows for 32100 / 250100 real tokens.
"""

from typing import Any, Dict, List, Optional

from distillm_tune.models._registry import LoRASettings
from distillm_tune.models.t5._component_builders import lora_t5, t5
from distillm_tune.models.t5._model import T5EncoderDecoder

_SIZES = {
    "small": dict(num_layers=8, d_model=512, num_heads=6, d_ff=1024),
    "base": dict(num_layers=12, d_model=768, num_heads=12, d_ff=2048),
    "large": dict(num_layers=24, d_model=1024, num_heads=16, d_ff=2816),
    "xl": dict(num_layers=24, d_model=2048, num_heads=32, d_ff=5120),
}
_VOCAB = {"t5": 32128, "mt5": 250112}
# Embedding rows -> ids the SentencePiece model + 100 sentinels really use.
_REAL_VOCAB = {32128: 32100, 250112: 250100}


def _kwargs(family: str, size: str) -> Dict[str, Any]:
    return dict(_SIZES[size], d_kv=64, vocab_size=_VOCAB[family])


def _lora(family, size, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output, lora_rank,
          lora_alpha, lora_dropout):
    return lora_t5(**_kwargs(family, size), lora_attn_modules=lora_attn_modules,
                   apply_lora_to_mlp=apply_lora_to_mlp, apply_lora_to_output=apply_lora_to_output,
                   lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout)


def t5_v1_1_small() -> T5EncoderDecoder:
    return t5(**_kwargs("t5", "small"))


def t5_v1_1_base() -> T5EncoderDecoder:
    return t5(**_kwargs("t5", "base"))


def t5_v1_1_large() -> T5EncoderDecoder:
    return t5(**_kwargs("t5", "large"))


def t5_v1_1_xl() -> T5EncoderDecoder:
    return t5(**_kwargs("t5", "xl"))


def mt5_small() -> T5EncoderDecoder:
    return t5(**_kwargs("mt5", "small"))


def mt5_base() -> T5EncoderDecoder:
    return t5(**_kwargs("mt5", "base"))


def mt5_large() -> T5EncoderDecoder:
    return t5(**_kwargs("mt5", "large"))


def mt5_xl() -> T5EncoderDecoder:
    return t5(**_kwargs("mt5", "xl"))


def _lora_builder(family: str, size: str):
    def builder(lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
                apply_lora_to_output: bool = False, lora_rank: int = 8, lora_alpha: float = 16.0,
                lora_dropout: float = 0.0) -> T5EncoderDecoder:
        return _lora(family, size, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output,
                     lora_rank, lora_alpha, lora_dropout)

    name = f"lora_{'t5_v1_1' if family == 't5' else 'mt5'}_{size}"
    builder.__name__ = builder.__qualname__ = name
    builder.__doc__ = f"{name[5:]} with LoRA on the named projections of every self/cross attention."
    return builder


lora_t5_v1_1_small = _lora_builder("t5", "small")
lora_t5_v1_1_base = _lora_builder("t5", "base")
lora_t5_v1_1_large = _lora_builder("t5", "large")
lora_t5_v1_1_xl = _lora_builder("t5", "xl")
lora_mt5_small = _lora_builder("mt5", "small")
lora_mt5_base = _lora_builder("mt5", "base")
lora_mt5_large = _lora_builder("mt5", "large")
lora_mt5_xl = _lora_builder("mt5", "xl")

_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")


def t5_kwargs_from_hf_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """``t5(...)`` arguments from an HF T5/mT5 ``config.json`` dict (defaults as ``T5Config``).

    Head tying: transformers 5 always writes ``tie_word_embeddings: true`` for T5/mT5 and records
    the real v1.0/v1.1 difference in ``scale_decoder_outputs``. v1.0 (tied head) is exactly the
    case whose decoder output is scaled, so both follow that flag: explicit
    ``scale_decoder_outputs`` if present, else ``tie_word_embeddings is not False`` for "t5";
    mT5 never ties or scales.
    """
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"T5 config lacks {missing}; a T5 config.json has {list(_REQUIRED)}")
    model_type = cfg.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
        raise ValueError(f"model_type {model_type!r} is not T5; expected 't5' or 'mt5'")
    ff = cfg.get("feed_forward_proj", "relu")
    if ff not in ("gated-gelu", "relu"):
        raise ValueError(
            f"feed_forward_proj {ff!r} is not supported; expected 'gated-gelu' (T5 v1.1, mT5) or 'relu' (T5 v1.0)"
        )
    if model_type == "mt5":
        tied = False
    elif "scale_decoder_outputs" in cfg:
        tied = bool(cfg["scale_decoder_outputs"])
    else:
        tied = cfg.get("tie_word_embeddings", True) is not False
    kwargs = {k: int(cfg[k]) for k in _REQUIRED}
    return dict(
        kwargs,
        num_decoder_layers=int(cfg.get("num_decoder_layers") or cfg["num_layers"]),
        relative_attention_num_buckets=int(cfg.get("relative_attention_num_buckets", 32)),
        relative_attention_max_distance=int(cfg.get("relative_attention_max_distance", 128)),
        norm_eps=float(cfg.get("layer_norm_epsilon", 1e-6)),
        feed_forward_proj=ff,
        tie_word_embeddings=tied,
        scale_decoder_output=tied,
    )


def build(hf_config: Dict[str, Any], lora: Optional[LoRASettings] = None) -> T5EncoderDecoder:
    """Registry entry: the model an HF T5/mT5 ``config.json`` describes (``dropout_rate`` is not
    used: like torchtune's own models, the port has no dropout)."""
    kwargs = t5_kwargs_from_hf_config(hf_config)
    if lora is None:
        return t5(**kwargs)
    return lora_t5(**kwargs, lora_attn_modules=list(lora.lora_attn_modules),
                   apply_lora_to_mlp=lora.apply_lora_to_mlp, apply_lora_to_output=lora.apply_lora_to_output,
                   lora_rank=lora.lora_rank, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout)


def real_vocab_size(hf_config: Dict[str, Any]) -> int:
    """Ids the tokenizer really uses: 32100 of T5's 32128 rows, 250100 of mT5's 250112."""
    vocab = int(hf_config["vocab_size"])
    return _REAL_VOCAB.get(vocab, vocab)
