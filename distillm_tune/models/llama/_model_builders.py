"""OpenLLaMA (plain Llama) builders on torchtune's ``llama2`` component builders.

No fork: torchtune's ``llama2`` / ``lora_llama2`` already are the Llama architecture (pre-norm
RMSNorm, SwiGLU MLP, RoPE, GQA). What this module adds is the mapping from an HF ``config.json`` to
their arguments, the fixed OpenLLaMA v2 sizes (whose ``norm_eps`` is 1e-6, not the builder's 1e-5
default), and the refusals for Llama variants those builders cannot express.
"""

from typing import Any, Dict, Optional

from torch import nn
from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.modules import RotaryPositionalEmbeddings, TransformerDecoder

from distillm_tune.models._registry import LoRASettings

# torchtune's lora_llama2 hard-codes RotaryPositionalEmbeddings' default base.
_TORCHTUNE_LORA_ROPE_BASE = 10000.0

_OPEN_LLAMA_COMMON = dict(vocab_size=32000, max_seq_len=2048, norm_eps=1e-6, rope_base=10000.0)
OPEN_LLAMA_3B_V2 = dict(
    num_layers=26, embed_dim=3200, num_heads=32, num_kv_heads=32, intermediate_dim=8640,
    **_OPEN_LLAMA_COMMON,
)
OPEN_LLAMA_7B_V2 = dict(
    num_layers=32, embed_dim=4096, num_heads=32, num_kv_heads=32, intermediate_dim=11008,
    **_OPEN_LLAMA_COMMON,
)


def _rope_theta(hf_config: Dict[str, Any]) -> float:
    """RoPE base from either config form: transformers 4 (``rope_theta``, ``rope_scaling``) or
    transformers 5 (``rope_parameters: {rope_theta, rope_type}``). Scaled RoPE is refused because
    torchtune's llama2 rotary embedding has no scaling and would silently give other logits."""
    params = hf_config.get("rope_parameters") or {}
    scaling = hf_config.get("rope_scaling")
    rope_type = params.get("rope_type", "default")
    if scaling or rope_type != "default":
        raise ValueError(
            f"Llama config uses scaled RoPE (rope_scaling={scaling!r}, rope_type={rope_type!r}); "
            "only the default rotary embedding is supported"
        )
    return float(params.get("rope_theta", hf_config.get("rope_theta", 10000.0)))


def llama_args_from_hf(hf_config: Dict[str, Any]) -> Dict[str, Any]:
    """Translate an HF Llama ``config.json`` into ``llama2(...)`` keyword arguments.

    ``num_key_value_heads`` defaults to ``num_attention_heads`` (old configs, OpenLLaMA's among
    them, lack it). Features the torchtune builder cannot reproduce raise ``ValueError``.
    """
    required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                "vocab_size")
    missing = [k for k in required if k not in hf_config]
    if missing:
        raise ValueError(f"Llama config lacks {missing}; an HF LlamaConfig has all of {required}")
    heads = int(hf_config["num_attention_heads"])
    dim = int(hf_config["hidden_size"])
    head_dim = hf_config.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        raise ValueError(
            f"Llama config has head_dim={head_dim} with {heads} heads and hidden_size={dim}; "
            "torchtune's llama2 needs head_dim * num_attention_heads == hidden_size"
        )
    for flag in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        if hf_config.get(flag, False):
            raise ValueError(f"Llama config sets {flag}=True; OpenLLaMA-style models need False")
    act = hf_config.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"Llama config has hidden_act={act!r}; expected 'silu'")
    return dict(
        vocab_size=int(hf_config["vocab_size"]),
        num_layers=int(hf_config["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf_config.get("num_key_value_heads") or heads),
        embed_dim=dim,
        intermediate_dim=int(hf_config["intermediate_size"]),
        max_seq_len=int(hf_config.get("max_position_embeddings", 2048)),
        norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        rope_base=_rope_theta(hf_config),
    )


def _lora_llama(args: Dict[str, Any], lora: LoRASettings) -> TransformerDecoder:
    """``lora_llama2`` with the RoPE base it does not take: swapped in after building."""
    rope_base = args.pop("rope_base")
    model = lora_llama2(
        lora_attn_modules=list(lora.lora_attn_modules),
        apply_lora_to_mlp=lora.apply_lora_to_mlp,
        apply_lora_to_output=lora.apply_lora_to_output,
        lora_rank=lora.lora_rank,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        **args,
    )
    if rope_base != _TORCHTUNE_LORA_ROPE_BASE:
        head_dim = args["embed_dim"] // args["num_heads"]
        for layer in model.layers:
            layer.attn.pos_embeddings = RotaryPositionalEmbeddings(
                dim=head_dim, max_seq_len=args["max_seq_len"], base=rope_base
            )
    return model


def _build(args: Dict[str, Any], lora: Optional[LoRASettings]) -> TransformerDecoder:
    args = dict(args)
    if lora is None:
        return llama2(**args)
    return _lora_llama(args, lora)


def build_llama(hf_config: Dict[str, Any], lora: Optional[LoRASettings] = None) -> nn.Module:
    """Registry ``build``: torchtune ``TransformerDecoder`` (optionally LoRA) from config.json."""
    return _build(llama_args_from_hf(hf_config), lora)


def open_llama_3b_v2() -> TransformerDecoder:
    """OpenLLaMA 3B v2: 26 layers, dim 3200, 32 heads (head_dim 100), ffn 8640."""
    return _build(OPEN_LLAMA_3B_V2, None)


def open_llama_7b_v2() -> TransformerDecoder:
    """OpenLLaMA 7B v2: 32 layers, dim 4096, 32 heads, ffn 11008."""
    return _build(OPEN_LLAMA_7B_V2, None)


def lora_open_llama_3b_v2(
    lora_attn_modules=("q_proj", "v_proj"),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
) -> TransformerDecoder:
    """OpenLLaMA 3B v2 with LoRA adapters (arguments as in :class:`LoRASettings`)."""
    return _build(OPEN_LLAMA_3B_V2, LoRASettings(
        lora_attn_modules=tuple(lora_attn_modules), apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
    ))


def lora_open_llama_7b_v2(
    lora_attn_modules=("q_proj", "v_proj"),
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
) -> TransformerDecoder:
    """OpenLLaMA 7B v2 with LoRA adapters (arguments as in :class:`LoRASettings`)."""
    return _build(OPEN_LLAMA_7B_V2, LoRASettings(
        lora_attn_modules=tuple(lora_attn_modules), apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output, lora_rank=lora_rank, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
    ))
