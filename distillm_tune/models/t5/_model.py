"""T5 v1.1 / mT5 encoder-decoder on torchtune components, and its cached decode loop.

What torchtune gives is reused as is: ``MultiHeadAttention`` (projections, ``KVCache`` handling),
``TransformerSelfAttentionLayer`` (the pre-norm encoder block), ``RMSNorm`` (fp32 variance, no
mean subtraction: T5's layer norm), ``FeedForward`` (gated GELU-tanh) and ``LoRALinear``. Only what
T5 needs beyond them is here:

* attention with scale 1.0 and an additive float bias (relative positions + padding/causal mask
  folded together as HF does: ``where(mask, bias, finfo.min)``). ``MultiHeadAttention`` hands its
  ``mask`` straight to ``self._attention_call``, so swapping that one callable is enough;
* the relative-position bias, one table per stack (HF keeps it in block 0's self-attention and
  shares it with every layer of that stack);
* a decoder block with self-attention, cross-attention and feed-forward;
* ``generate_seq2seq``: torchtune's ``generate`` is decoder-only and treats token 0 as padding,
  but T5 starts decoding *from* token 0.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import MultiHeadAttention
from torchtune.modules.common_utils import local_kv_cache

from distillm_tune.generation import all_ranks_done, mkl_packed_linears, sample_next_token


def _t5_attention_call(q, k, v, mask, dropout_p, is_causal):
    # T5 folds the 1/sqrt(d) scaling into its weights: scores are plain q.k + bias.
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=1.0
    )


class T5Attention(MultiHeadAttention):
    """``MultiHeadAttention`` with scale 1.0; ``mask`` is an additive float bias ``[b|1, h, q, k]``.

    ``embed_dim`` is set to the inner dim ``num_heads * head_dim`` (it is only used for a
    divisibility check), because T5's d_model need not equal it (t5-small: 512 vs 6 x 64).
    """

    def __init__(self, *, num_heads: int, head_dim: int, q_proj, k_proj, v_proj, output_proj):
        super().__init__(
            embed_dim=num_heads * head_dim, num_heads=num_heads, num_kv_heads=num_heads,
            head_dim=head_dim, q_proj=q_proj, k_proj=k_proj, v_proj=v_proj,
            output_proj=output_proj, is_causal=False,
        )
        self._attention_call = _t5_attention_call


def relative_position_bucket(relative_position, bidirectional: bool, num_buckets: int, max_distance: int):
    """Mesh-TensorFlow bucketing of ``key_pos - query_pos``: exact buckets for short distances,
    log-spaced up to ``max_distance``; the encoder tells left from right, the decoder (which only
    sees the past) does not."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    log_ratio = torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (log_ratio * (num_buckets - max_exact)).long()).clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


class T5RelativePositionBias(nn.Module):
    """The per-stack table ``[num_buckets, num_heads]`` turned into an additive bias."""

    def __init__(self, num_buckets: int, max_distance: int, num_heads: int, bidirectional: bool):
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, num_heads)

    def forward(self, q_len: int, k_len: int, q_offset: int = 0) -> torch.Tensor:
        """Bias ``[1, heads, q_len, k_len]`` for queries at positions ``q_offset + i``."""
        device = self.embedding.weight.device
        q_pos = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
        k_pos = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(
            k_pos - q_pos, self.bidirectional, self.num_buckets, self.max_distance
        )
        return self.embedding(buckets).permute(2, 0, 1).unsqueeze(0)


def _masked(bias: torch.Tensor, keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    bias = bias.to(dtype)
    return torch.where(keep, bias, torch.finfo(dtype).min)


class T5Encoder(nn.Module):
    """Embeddings in, final-normed hidden states out (``TransformerSelfAttentionLayer`` blocks)."""

    def __init__(self, layers: nn.ModuleList, rel_pos_bias: T5RelativePositionBias, norm: nn.Module):
        super().__init__()
        self.layers, self.rel_pos_bias, self.norm = layers, rel_pos_bias, norm

    def forward(self, h: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = h.shape[1]
        bias = self.rel_pos_bias(s, s).to(h.dtype)
        if padding_mask is not None:
            bias = _masked(bias, padding_mask[:, None, None, :].bool(), h.dtype)
        for layer in self.layers:
            h = layer(h, mask=bias)
        return self.norm(h)


class T5DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention over the encoder output, feed-forward.

    With caches enabled, the cross-attention K/V are computed from ``encoder_out`` once (first
    step) and read back from the cache afterwards.
    """

    def __init__(self, *, attn, cross_attn, mlp, sa_norm, ca_norm, mlp_norm):
        super().__init__()
        self.attn, self.cross_attn, self.mlp = attn, cross_attn, mlp
        self.sa_norm, self.ca_norm, self.mlp_norm = sa_norm, ca_norm, mlp_norm

    def setup_caches(self, batch_size, dtype, *, encoder_max_seq_len, decoder_max_seq_len):
        self.attn.setup_cache(batch_size, dtype, max_seq_len=decoder_max_seq_len)
        self.cross_attn.setup_cache(batch_size, dtype, max_seq_len=encoder_max_seq_len)

    def caches_are_setup(self) -> bool:
        return self.attn.kv_cache is not None

    def caches_are_enabled(self) -> bool:
        return self.attn.cache_enabled

    def reset_cache(self):
        self.attn.reset_cache()
        self.cross_attn.reset_cache()

    def forward(self, x, *, self_bias, encoder_out, cross_bias):
        h = self.sa_norm(x)
        x = x + self.attn(h, h, mask=self_bias)
        cache = self.cross_attn.kv_cache
        if cache is not None and self.cross_attn.cache_enabled and cache.size > 0:
            encoder_out = None  # reuse the cached cross-attention K/V
        x = x + self.cross_attn(self.ca_norm(x), encoder_out, mask=cross_bias)
        return x + self.mlp(self.mlp_norm(x))


class T5Decoder(nn.Module):
    """Causal decoder stack; positions continue from the self-attention cache when enabled."""

    def __init__(self, layers: nn.ModuleList, rel_pos_bias: T5RelativePositionBias, norm: nn.Module):
        super().__init__()
        self.layers, self.rel_pos_bias, self.norm = layers, rel_pos_bias, norm

    def forward(self, h, encoder_out, encoder_padding_mask=None):
        s = h.shape[1]
        attn0 = self.layers[0].attn
        if attn0.kv_cache is not None and attn0.cache_enabled:
            offset, k_len = attn0.kv_cache.size, attn0.kv_cache.k_cache.shape[2]
        else:
            offset, k_len = 0, s
        q_pos = torch.arange(offset, offset + s, device=h.device)[:, None]
        causal = torch.arange(k_len, device=h.device)[None, :] <= q_pos
        self_bias = _masked(self.rel_pos_bias(s, k_len, offset), causal, h.dtype)
        cross_bias = None  # cross-attention has no position bias, only the padding mask
        if encoder_padding_mask is not None:
            zeros = torch.zeros((), dtype=h.dtype, device=h.device)
            cross_bias = _masked(zeros, encoder_padding_mask[:, None, None, :].bool(), h.dtype)
        for layer in self.layers:
            h = layer(h, self_bias=self_bias, encoder_out=encoder_out, cross_bias=cross_bias)
        return self.norm(h)


class T5EncoderDecoder(nn.Module):
    """``model(input_ids, decoder_input_ids, encoder_padding_mask=None) -> logits [B, T, V]``.

    ``output`` is the untied LM head of T5 v1.1 / mT5; ``output=None`` ties it to the input
    embedding (T5 v1.0). ``scale_decoder_output`` multiplies the decoder output by d_model^-0.5
    before the head, as T5 v1.0 does.
    """

    def __init__(self, *, tok_embeddings, encoder, decoder, output=None, scale_decoder_output=False):
        super().__init__()
        self.tok_embeddings, self.encoder, self.decoder, self.output = (
            tok_embeddings, encoder, decoder, output)
        self.scale_decoder_output = scale_decoder_output

    def encode(self, input_ids, encoder_padding_mask=None):
        return self.encoder(self.tok_embeddings(input_ids), encoder_padding_mask)

    def decode(self, decoder_input_ids, encoder_out, encoder_padding_mask=None):
        """Logits for ``decoder_input_ids``; with caches enabled, the next positions only."""
        h = self.decoder(self.tok_embeddings(decoder_input_ids), encoder_out, encoder_padding_mask)
        if self.scale_decoder_output:
            h = h * self.tok_embeddings.embedding_dim ** -0.5
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)
        return self.output(h)

    def forward(self, input_ids, decoder_input_ids, encoder_padding_mask=None):
        encoder_out = self.encode(input_ids, encoder_padding_mask)
        return self.decode(decoder_input_ids, encoder_out, encoder_padding_mask)

    # The cache API torchtune's ``local_kv_cache`` / ``delete_kv_caches`` expect.
    def setup_caches(self, batch_size, dtype, *, encoder_max_seq_len, decoder_max_seq_len):
        for layer in self.decoder.layers:
            layer.setup_caches(batch_size, dtype, encoder_max_seq_len=encoder_max_seq_len,
                               decoder_max_seq_len=decoder_max_seq_len)

    def caches_are_setup(self) -> bool:
        return self.decoder.layers[0].caches_are_setup()

    def caches_are_enabled(self) -> bool:
        return self.decoder.layers[0].caches_are_enabled()

    def reset_caches(self):
        for layer in self.decoder.layers:
            layer.reset_cache()


def _call_through_root(model: nn.Module, method, *args):
    """``method(*args)`` called as the model's forward, through ``model.__call__``: FSDP2 hooks the
    root module's call to all-gather the parameters outside its sharded layers (embeddings, head,
    final norms); calling ``encode``/``decode`` directly would meet them still sharded. An instance
    attribute shadows ``forward`` for the one call."""
    model.forward = method
    try:
        return model(*args)
    finally:
        del model.forward


@torch.no_grad()
def generate_seq2seq(model: T5EncoderDecoder, input_ids, encoder_padding_mask=None, max_new_tokens=128,
                     decoder_start_token_id=0, eos_id=1, pad_id=0, temperature=1.0, greedy=False,
                     top_k=None, top_p=1.0, generator=None, sync_across_ranks=True,
                     cache_dtype=None, pack_weights=True) -> torch.Tensor:
    """Generated ids ``[B, n]`` (n <= max_new_tokens; start token not included), ``pad_id``
    after each row's EOS; stops early once every row has emitted EOS (like HF ``generate``).

    Encodes once; the first decoder step fills the cross-attention caches, later steps feed one
    token and reuse every cached K/V (on CPU in fp32 with MKL-packed linear weights:
    ``distillm_tune.generation.mkl_packed_linears``). Runs in eval mode and restores the previous mode. Under
    torch.distributed (``sync_across_ranks``) all ranks stop at the same step (FSDP lockstep).
    ``cache_dtype``: the KV caches' dtype, default the embedding's (pass the compute dtype under
    autocast or FSDP mixed precision, where keys and values are bf16 while the weights are fp32).
    ``pack_weights``: False multiplies with ``F.linear`` instead of MKL-packed weights on CPU.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, src_len = input_ids.shape
    was_training = model.training
    model.eval()
    try:
        dtype = cache_dtype or model.tok_embeddings.weight.dtype
        with local_kv_cache(model, batch_size=batch, device=input_ids.device, dtype=dtype,
                            encoder_max_seq_len=src_len, decoder_max_seq_len=max_new_tokens), \
                mkl_packed_linears(model, batch, enabled=pack_weights and input_ids.device.type == "cpu"):
            encoder_out = _call_through_root(model, model.encode, input_ids, encoder_padding_mask)
            tokens = torch.full((batch, 1), decoder_start_token_id, dtype=torch.long, device=input_ids.device)
            done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
            out = []
            for _ in range(max_new_tokens):
                logits = _call_through_root(model, model.decode, tokens, encoder_out, encoder_padding_mask)[:, -1]
                nxt = sample_next_token(logits, temperature, top_k, top_p, generator, greedy)
                nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
                out.append(nxt)
                done = done | (nxt == eos_id)
                if all_ranks_done(bool(done.all()), input_ids.device, sync_across_ranks):
                    break
                tokens = nxt[:, None]
    finally:
        model.train(was_training)
    return torch.stack(out, dim=1)
