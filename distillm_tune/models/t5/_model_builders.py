"""``build`` from an HF T5 / mT5 ``config.json`` (the paper's sizes are those configs).

Vocab: 32128 (T5), 250112 (mT5) embedding rows for 32100 / 250100 real tokens.
"""

from typing import Any, Dict, Optional

from distillm_tune.models._registry import LoRASettings
from distillm_tune.models.t5._component_builders import lora_t5, t5
from distillm_tune.models.t5._model import T5EncoderDecoder

# Embedding rows -> ids the SentencePiece model + 100 sentinels really use.
_REAL_VOCAB = {32128: 32100, 250112: 250100}


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
