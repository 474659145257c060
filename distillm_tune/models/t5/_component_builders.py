"""Assemble ``T5EncoderDecoder`` from torchtune modules, with or without LoRA.

Module names (what ``_convert_weights`` maps HF keys onto)::

    tok_embeddings                                   shared
    {encoder,decoder}.rel_pos_bias.embedding         block.0.layer.0.SelfAttention.relative_attention_bias
    {encoder,decoder}.layers.i.attn.{q,k,v,output}_proj  block.i.layer.0.SelfAttention.{q,k,v,o}
    decoder.layers.i.cross_attn.*                    block.i.layer.1.EncDecAttention.*
    *.layers.i.{sa,ca,mlp}_norm                      layer norms; {encoder,decoder}.norm: final_layer_norm
    *.layers.i.mlp.{w1,w3,w2}                        DenseReluDense.{wi_0,wi_1,wo} (relu: w1 = wi)
    output                                           lm_head (absent when tied)
"""

from typing import List, Optional

from torch import nn
from torchtune.modules import FeedForward, RMSNorm, TransformerSelfAttentionLayer
from torchtune.modules.peft import LoRALinear

from distillm_tune.models.t5._model import (
    T5Attention,
    T5Decoder,
    T5DecoderLayer,
    T5Encoder,
    T5EncoderDecoder,
    T5RelativePositionBias,
)

LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")
FEED_FORWARD_PROJ = ("gated-gelu", "relu")


class _LinearFactory:
    """``nn.Linear`` without bias, or ``LoRALinear`` for the projections LoRA applies to."""

    def __init__(self, rank=0, alpha=0.0, dropout=0.0):
        self.rank, self.alpha, self.dropout = rank, alpha, dropout

    def __call__(self, in_dim, out_dim, lora=False):
        if lora:
            return LoRALinear(in_dim, out_dim, rank=self.rank, alpha=self.alpha, dropout=self.dropout)
        return nn.Linear(in_dim, out_dim, bias=False)


def _attention(d_model, num_heads, d_kv, linear, lora_modules):
    inner = num_heads * d_kv
    return T5Attention(
        num_heads=num_heads, head_dim=d_kv,
        q_proj=linear(d_model, inner, "q_proj" in lora_modules),
        k_proj=linear(d_model, inner, "k_proj" in lora_modules),
        v_proj=linear(d_model, inner, "v_proj" in lora_modules),
        output_proj=linear(inner, d_model, "output_proj" in lora_modules),
    )


def _feed_forward(d_model, d_ff, feed_forward_proj, linear, lora):
    if feed_forward_proj == "relu":  # T5 v1.0: wo(relu(wi x))
        return FeedForward(gate_proj=linear(d_model, d_ff, lora), down_proj=linear(d_ff, d_model, lora),
                           activation=nn.ReLU())
    # gated-gelu (v1.1 / mT5): wo(gelu_tanh(wi_0 x) * wi_1 x); HF's "gelu_new" is the tanh form
    return FeedForward(gate_proj=linear(d_model, d_ff, lora), down_proj=linear(d_ff, d_model, lora),
                       up_proj=linear(d_model, d_ff, lora), activation=nn.GELU(approximate="tanh"))


def _build(*, vocab_size, d_model, d_kv, d_ff, num_layers, num_heads, num_decoder_layers=None,
           relative_attention_num_buckets=32, relative_attention_max_distance=128, norm_eps=1e-6,
           feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_output=None,
           linear=None, lora_attn_modules=(), apply_lora_to_mlp=False, apply_lora_to_output=False):
    if feed_forward_proj not in FEED_FORWARD_PROJ:
        raise ValueError(
            f"feed_forward_proj {feed_forward_proj!r} is not supported; expected one of {FEED_FORWARD_PROJ}")
    bad = [m for m in lora_attn_modules if m not in LORA_ATTN_MODULES]
    if bad:
        raise ValueError(
            f"lora_attn_modules {bad} are not T5 attention projections; expected a subset of {LORA_ATTN_MODULES}")
    if apply_lora_to_output and tie_word_embeddings:
        raise ValueError("apply_lora_to_output needs an untied lm_head; this T5 ties it to the embedding")
    linear = linear or _LinearFactory()
    num_decoder_layers = num_layers if num_decoder_layers is None else num_decoder_layers
    scale_decoder_output = tie_word_embeddings if scale_decoder_output is None else scale_decoder_output

    def norm():
        return RMSNorm(d_model, eps=norm_eps)

    def attn():
        return _attention(d_model, num_heads, d_kv, linear, lora_attn_modules)

    def mlp():
        return _feed_forward(d_model, d_ff, feed_forward_proj, linear, apply_lora_to_mlp)

    def rel_bias(bidirectional):
        return T5RelativePositionBias(relative_attention_num_buckets, relative_attention_max_distance,
                                      num_heads, bidirectional)

    encoder_layers = nn.ModuleList(
        TransformerSelfAttentionLayer(attn=attn(), mlp=mlp(), sa_norm=norm(), mlp_norm=norm())
        for _ in range(num_layers)
    )
    decoder_layers = nn.ModuleList(
        T5DecoderLayer(attn=attn(), cross_attn=attn(), mlp=mlp(), sa_norm=norm(), ca_norm=norm(), mlp_norm=norm())
        for _ in range(num_decoder_layers)
    )
    return T5EncoderDecoder(
        tok_embeddings=nn.Embedding(vocab_size, d_model),
        encoder=T5Encoder(encoder_layers, rel_bias(True), norm()),
        decoder=T5Decoder(decoder_layers, rel_bias(False), norm()),
        output=None if tie_word_embeddings else linear(d_model, vocab_size, apply_lora_to_output),
        scale_decoder_output=scale_decoder_output,
    )


def t5(*, vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int,
       num_decoder_layers: Optional[int] = None, relative_attention_num_buckets: int = 32,
       relative_attention_max_distance: int = 128, norm_eps: float = 1e-6,
       feed_forward_proj: str = "gated-gelu", tie_word_embeddings: bool = False,
       scale_decoder_output: Optional[bool] = None) -> T5EncoderDecoder:
    """T5 encoder-decoder. Defaults are v1.1 / mT5 (gated GELU, untied head, no output scaling);
    ``tie_word_embeddings=True`` gives v1.0's tied head, scaled by d_model^-0.5 unless
    ``scale_decoder_output`` says otherwise."""
    return _build(**locals())


def lora_t5(*, lora_attn_modules: List[str], apply_lora_to_mlp: bool = False,
            apply_lora_to_output: bool = False, lora_rank: int = 8, lora_alpha: float = 16.0,
            lora_dropout: float = 0.0, **t5_kwargs) -> T5EncoderDecoder:
    """``t5(**t5_kwargs)`` with ``LoRALinear`` on the named projections of every self- and
    cross-attention of both stacks, optionally on the three FF projections and the LM head."""
    return _build(**t5_kwargs, linear=_LinearFactory(lora_rank, lora_alpha, lora_dropout),
                  lora_attn_modules=tuple(lora_attn_modules), apply_lora_to_mlp=apply_lora_to_mlp,
                  apply_lora_to_output=apply_lora_to_output)
