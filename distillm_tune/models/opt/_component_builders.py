"""OPT on torchtune components (see MODEL_PORTS.md).

Same block as GPT-2 but with a ReLU MLP of width ``intermediate_dim``, a position table of
``max_seq_len + 2`` rows looked up at ``pos + 2``, and two variants the 350m model uses:
post-LN blocks without a final LN (``pre_norm=False``) and a narrower token table with bias-free
``project_in``/``project_out`` (``word_embed_dim != embed_dim``).
"""

from typing import List, Optional

from distillm_tune.models._registry import LoRASettings
from distillm_tune.models.modules import LearnedPositionDecoder, learned_position_decoder

OPT_POSITION_OFFSET = 2


def opt(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    word_embed_dim: Optional[int] = None,
    pre_norm: bool = True,
    final_norm: Optional[bool] = None,
    activation: str = "relu",
    attn_dropout: float = 0.0,
    resid_dropout: float = 0.0,
) -> LearnedPositionDecoder:
    """OPT decoder. ``final_norm`` defaults to ``pre_norm`` (HF: final LN only with
    ``do_layer_norm_before``); ``word_embed_dim`` defaults to ``embed_dim``."""
    return _opt(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, embed_dim=embed_dim,
        intermediate_dim=intermediate_dim, max_seq_len=max_seq_len, word_embed_dim=word_embed_dim,
        pre_norm=pre_norm, final_norm=final_norm, activation=activation,
        attn_dropout=attn_dropout, resid_dropout=resid_dropout,
    )


def lora_opt(
    lora_attn_modules: List[str],
    apply_lora_to_mlp: bool = False,
    apply_lora_to_output: bool = False,
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    word_embed_dim: Optional[int] = None,
    pre_norm: bool = True,
    final_norm: Optional[bool] = None,
    activation: str = "relu",
    attn_dropout: float = 0.0,
    resid_dropout: float = 0.0,
    lora_rank: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
) -> LearnedPositionDecoder:
    """OPT with LoRA on ``lora_attn_modules`` (subset of q_proj, k_proj, v_proj, output_proj)
    and optionally fc1/fc2, as torchtune's ``lora_llama2``. ``apply_lora_to_output=True`` raises:
    the head is tied to the token embeddings."""
    lora = LoRASettings(
        lora_attn_modules=tuple(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
    )
    return _opt(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, embed_dim=embed_dim,
        intermediate_dim=intermediate_dim, max_seq_len=max_seq_len, word_embed_dim=word_embed_dim,
        pre_norm=pre_norm, final_norm=final_norm, activation=activation,
        attn_dropout=attn_dropout, resid_dropout=resid_dropout, lora=lora,
    )


def _opt(*, pre_norm, final_norm, activation, lora=None, **kwargs) -> LearnedPositionDecoder:
    return learned_position_decoder(
        activation_name=activation,
        norm_eps=1e-5,
        pre_norm=pre_norm,
        final_norm=pre_norm if final_norm is None else final_norm,
        pos_offset=OPT_POSITION_OFFSET,
        lora=lora,
        **kwargs,
    )
