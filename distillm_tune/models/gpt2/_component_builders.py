"""GPT-2 on torchtune components: pre-LN blocks, learned positions, tied head (see MODEL_PORTS.md)."""

from typing import List, Optional

from distillm_tune.models._registry import LoRASettings
from distillm_tune.models.modules import LearnedPositionDecoder, learned_position_decoder


def gpt2(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: Optional[int] = None,
    norm_eps: float = 1e-5,
    activation: str = "gelu_new",
    attn_dropout: float = 0.0,
    resid_dropout: float = 0.0,
    embed_dropout: float = 0.0,
) -> LearnedPositionDecoder:
    """GPT-2 decoder. ``intermediate_dim`` defaults to ``4 * embed_dim`` (HF ``n_inner=None``);
    ``max_seq_len`` is HF ``n_positions`` (rows of the position table)."""
    return _gpt2(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, embed_dim=embed_dim,
        max_seq_len=max_seq_len, intermediate_dim=intermediate_dim, norm_eps=norm_eps,
        activation=activation, attn_dropout=attn_dropout, resid_dropout=resid_dropout,
        embed_dropout=embed_dropout,
    )


def lora_gpt2(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    max_seq_len: int,
    intermediate_dim: Optional[int] = None,
    norm_eps: float = 1e-5,
    activation: str = "gelu_new",
    attn_dropout: float = 0.0,
    resid_dropout: float = 0.0,
    embed_dropout: float = 0.0,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
) -> LearnedPositionDecoder:
    """GPT-2 with LoRA on ``lora_attn_modules`` (subset of q_proj, k_proj, v_proj, output_proj)
    and optionally the MLP, as torchtune's ``lora_llama2``. ``apply_lora_to_output=True`` raises:
    the head is tied to the token embeddings."""
    lora = LoRASettings(
        lora_attn_modules=tuple(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
    )
    return _gpt2(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, embed_dim=embed_dim,
        max_seq_len=max_seq_len, intermediate_dim=intermediate_dim, norm_eps=norm_eps,
        activation=activation, attn_dropout=attn_dropout, resid_dropout=resid_dropout,
        embed_dropout=embed_dropout, lora=lora,
    )


def _gpt2(*, intermediate_dim, activation, embed_dim, lora=None, **kwargs) -> LearnedPositionDecoder:
    """The GPT-2 choices on top of the shared builder: pre-LN, final LN, positions from 0."""
    return learned_position_decoder(
        embed_dim=embed_dim,
        intermediate_dim=intermediate_dim or 4 * embed_dim,
        activation_name=activation,
        pre_norm=True,
        final_norm=True,
        pos_offset=0,
        lora=lora,
        **kwargs,
    )
