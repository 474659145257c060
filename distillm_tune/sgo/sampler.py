"""Batched, left-padded, KV-cached sampling of student outputs (DISTILLM_SPEC §3).

Generation dominates the cost of on-policy KD (paper Fig. 2), so this sampler differs from
``torchtune.generation.generate`` where that one is slow or unsafe for training:

- only the last position's logits are computed and kept (torchtune returns fp32 logits for every
  step, ``[B, T, V]``); a pre-hook on the final norm slices the hidden states to the last position
  so even the prompt pass projects a single position onto the vocabulary;
- the model is switched to eval mode (dropout, LoRA dropout off) and every module's mode is
  restored afterwards; KV caches are set up for the call and deleted afterwards;
- rows that produced EOS leave the batch (their KV-cache rows are dropped once a quarter of the
  batch has finished, so the copy is amortised): real prompts stop at different lengths, and
  finished rows would otherwise cost a full forward each step. The random draws stay those of the
  whole batch (one uniform per original row per step), so the outputs do not depend on when rows
  are dropped;
- attention reads only the filled prefix of the static KV cache (rounded up to a multiple of
  ``PREFIX_MULTIPLE`` slots) and shares key/value heads without copying them (grouped-query models):
  for the call, torchtune's ``MultiHeadAttention`` modules get a generation-time ``forward``
  (:func:`_prefix_attention`) that writes the cache at a slot the sampler passes as an int (no
  host sync) and calls ``scaled_dot_product_attention(..., enable_gqa=True)`` on
  ``cache[:, :, :prefix]``. torchtune's own forward expands the key/value heads of the whole cache
  and attends over all of its ``prompt + max_new_tokens`` slots every step; the slots past the
  prefix are masked out there, so the result is the same;
- on CPU in fp32 the linear layers multiply with MKL-packed copies of their weights, made once per
  call (:func:`distillm_tune.generation.mkl_packed_linears`): MKL's plain sgemm is slowest at the
  few-row shapes of decoding;
- generation stops at EOS per row, and the batch stops when all rows are done. Under
  ``torch.distributed`` the "all done" flag is all-reduced, so every rank runs the same number of
  forward passes: FSDP2 (``reshard_after_forward=True``) all-gathers parameters inside every
  forward, and a rank that stopped early would leave the others waiting forever. A rank whose rows
  are finished keeps stepping with pad tokens (and draws nothing from the generator) until all agree.

The returned ``{"prompt", "response"}`` samples keep the EOS the model produced, so
``collate_prompt_response`` gives them labels shifted exactly like ground-truth data.
"""

import contextlib
import types
from typing import Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.modules import KVCache, MultiHeadAttention
from torchtune.modules.common_utils import local_kv_cache

from distillm_tune.generation import all_ranks_done, mkl_packed_linears, sample_next_token


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    prompts: List[List[int]],
    *,
    max_new_tokens: int,
    eos_ids: Iterable[int],
    pad_id: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    sync_across_ranks: bool = True,
    cache_dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device] = None,
    pack_weights: bool = True,
) -> List[Dict[str, List[int]]]:
    """Sample a response for each prompt from a torchtune ``TransformerDecoder``.

    Args:
        model: decoder with ``model(tokens, mask=..., input_pos=...)`` and torchtune's cache API
            (``setup_caches`` etc.); may be wrapped by FSDP2 ``fully_shard``. Its caches must not
            be set up already (they are created for this call and deleted afterwards).
        prompts: token id lists, any lengths (left-padded internally).
        max_new_tokens: most tokens generated per prompt; the same on every rank.
        eos_ids: stop tokens; a row stops at the first one it produces, which is kept.
        pad_id: id used for left padding and for rows that already stopped (never returned).
        temperature: 0 means greedy (argmax); otherwise logits are divided by it before sampling.
        top_p: nucleus sampling: keep the smallest set of most likely tokens whose mass >= top_p.
        top_k: keep only the ``top_k`` most likely tokens; None = off.
        generator: ``torch.Generator`` on the model's device for reproducible sampling.
        sync_across_ranks: all-reduce the "all rows done" flag when torch.distributed is
            initialized (then every rank of the default group must call this in lockstep).
        cache_dtype: KV-cache dtype; default the dtype of the model's first floating parameter
            (pass the compute dtype when FSDP mixed precision casts parameters).
        device: where the forward runs; default the device of the model's first parameter (pass
            it when parameters are offloaded to CPU, e.g. FSDP2 ``CPUOffloadPolicy``).
        pack_weights: on CPU in fp32, multiply with MKL-packed copies of the linear weights made
            for the call (:func:`distillm_tune.generation.mkl_packed_linears`: faster decoding,
            about the weights' size in extra memory during the call); False keeps ``F.linear``.

    Returns:
        ``[{"prompt": prompt, "response": generated ids}]`` in prompt order; a response ends at
        its first EOS (included), or holds ``max_new_tokens`` tokens if no EOS was produced.
    """
    if isinstance(eos_ids, (int, str)):
        raise ValueError(f"eos_ids must be a collection of token ids, got {eos_ids!r}")
    eos_list = sorted({int(e) for e in eos_ids})
    if isinstance(prompts, (list, tuple)):
        prompts = [[int(t) for t in p] for p in prompts]  # also accepts tensors / numpy rows
    _validate(model, prompts, max_new_tokens, temperature, top_p, top_k)
    params = list(model.parameters())
    device = params[0].device if device is None else torch.device(device)
    if cache_dtype is None:
        cache_dtype = next((p.dtype for p in params if p.is_floating_point()), torch.float32)

    bsz, plen = len(prompts), max(len(p) for p in prompts)
    total = plen + max_new_tokens
    tokens = torch.full((bsz, plen), pad_id, dtype=torch.long, device=device)
    real = torch.zeros((bsz, total), dtype=torch.bool, device=device)  # False = left padding
    for i, p in enumerate(prompts):
        tokens[i, plen - len(p) :] = torch.tensor(p, dtype=torch.long, device=device)
        real[i, plen - len(p) :] = True
    # position of each token within its own (unpadded) sequence; padding gets 0 (masked anyway)
    positions = (real.long().cumsum(-1) - 1).clamp_min(0)
    cols = torch.arange(total, device=device)
    # prompt pass: causal over the prompt, padding masked out; a padding query attends to itself
    # only, so its softmax row is not all -inf (NaN there would leak into values read through 0s)
    prefill_mask = (cols[None, :] <= torch.arange(plen, device=device)[:, None])[None] & real[:, None, :]
    diag = torch.arange(plen, device=device)
    prefill_mask[:, diag, diag] = True
    eos = torch.tensor(eos_list, dtype=torch.long, device=device)

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with local_kv_cache(
            model, batch_size=bsz, device=device, dtype=cache_dtype, decoder_max_seq_len=total
        ), _last_position_only(model), _prefix_attention(model) as attn_state, mkl_packed_linears(
            model, bsz, enabled=pack_weights and device.type == "cpu"
        ):
            attn_state.set(start=0, end=plen, total=total)
            logits = _last_logits(model(tokens, mask=prefill_mask, input_pos=positions[:, :plen]))
            caches = [m for m in model.modules() if isinstance(m, KVCache)]
            out = torch.full((bsz, max_new_tokens), pad_id, dtype=torch.long, device=device)
            done = torch.zeros(bsz, dtype=torch.bool, device=device)
            rows = torch.arange(bsz, device=device)  # the original row of each row in the batch
            greedy = temperature == 0
            local_done = False
            for t in range(max_new_tokens):
                if local_done:  # only stepping for the other ranks: feed pads, draw no randomness
                    nxt = torch.full((len(rows),), pad_id, dtype=torch.long, device=device)
                else:
                    draws = None if greedy else torch.rand((bsz, 1), generator=generator, device=device,
                                                           dtype=torch.float64)[rows]
                    nxt = sample_next_token(logits, temperature, top_k, top_p, generator, uniforms=draws)
                    nxt = torch.where(done[rows], torch.full_like(nxt, pad_id), nxt)
                    out[rows, t] = nxt
                    done[rows] |= torch.isin(nxt, eos)
                finished = done[rows]
                # one host sync a step: rows outside the batch are done, so all done = all in it done
                n_finished = int(finished.sum())
                local_done = local_done or n_finished == len(rows)
                if t == max_new_tokens - 1 or all_ranks_done(local_done, device, sync_across_ranks):
                    break
                if n_finished and (4 * n_finished >= len(rows) or local_done) and len(rows) > 1:
                    # keep one row when all are done: the forwards continue for the other ranks
                    keep = ~finished if not local_done else torch.arange(len(rows), device=device) == 0
                    rows, nxt = rows[keep], nxt[keep]
                    for cache in caches:
                        cache.k_cache, cache.v_cache = cache.k_cache[keep], cache.v_cache[keep]
                        cache.batch_size = len(rows)
                pos = plen + t  # sequence index of the token fed now
                step_mask = ((cols <= pos)[None, :] & real[rows])[:, None, :]
                attn_state.set(start=pos, end=pos + 1, total=total)
                logits = _last_logits(
                    model(nxt[:, None], mask=step_mask, input_pos=positions[rows, pos : pos + 1])
                )
    finally:
        for m, was_training in modes:
            m.training = was_training

    return [
        {"prompt": list(p), "response": _cut_at_eos(row, set(eos_list))}
        for p, row in zip(prompts, out.tolist())
    ]


def _validate(model, prompts, max_new_tokens, temperature, top_p, top_k) -> None:
    if not isinstance(prompts, (list, tuple)) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of token id lists")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty; at least one prompt token is needed")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if not (temperature >= 0.0):
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature!r}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    max_seq_len = getattr(model, "max_seq_len", None)
    longest = max(len(p) for p in prompts)
    if max_seq_len is not None and longest + max_new_tokens > max_seq_len:
        raise ValueError(
            f"longest prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_seq_len ({max_seq_len})"
        )
    if model.caches_are_setup():
        raise ValueError(
            "the model already has KV caches set up; generate_responses sets up its own "
            "(delete them first with torchtune.modules.common_utils.delete_kv_caches)"
        )


@contextlib.contextmanager
def _last_position_only(model: nn.Module):
    """Make the model project only the last position onto the vocabulary.

    The final norm and the output projection act per position, so slicing the norm's input to the
    last position gives the same last-position logits while skipping ``[B, prompt_len, V]``.
    Models without a ``norm`` submodule run unchanged (the last position is taken afterwards).
    """
    norm = getattr(model, "norm", None)
    if not isinstance(norm, nn.Module):
        yield
        return
    handle = norm.register_forward_pre_hook(lambda mod, args: (args[0][:, -1:], *args[1:]))
    try:
        yield
    finally:
        handle.remove()


PREFIX_MULTIPLE = 16  # attended cache prefixes are rounded up to this: few distinct shapes


class _PrefixState:
    """Where the sampler's next forward writes the KV cache and how much of it attention reads."""

    start: Optional[int] = None  # first cache slot written by the next forward
    prefix: Optional[int] = None  # attended slots: [0, prefix)
    _mask_key = None
    _mask: Optional[torch.Tensor] = None

    def set(self, *, start: int, end: int, total: int) -> None:
        self.start = start
        self.prefix = min(total, -(-end // PREFIX_MULTIPLE) * PREFIX_MULTIPLE)
        self._mask_key, self._mask = None, None

    def additive_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``[b, 1, q, prefix]`` 0 / -inf bias from the boolean ``[b, q, total]`` mask, made once per
        forward and shared by the layers (SDPA would convert the boolean mask the same way in every
        layer)."""
        key = (mask, dtype)
        if self._mask_key is None or self._mask_key[0] is not mask or self._mask_key[1] != dtype:
            allowed = mask[:, None, :, : self.prefix]
            self._mask = torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~allowed, float("-inf"))
            self._mask_key = key
        return self._mask


def _is_plain_attention(module: nn.Module) -> bool:
    """torchtune's ``MultiHeadAttention`` with its own ``forward`` and stock SDPA call: subclasses
    that change either (T5's scale-1 attention with a float bias) keep their own forward."""
    if not isinstance(module, MultiHeadAttention) or "forward" in vars(module):
        return False
    if type(module).forward is not MultiHeadAttention.forward:
        return False
    call = getattr(module, "_attention_call", None)
    return getattr(call, "__qualname__", "").startswith("_sdpa_or_flex_attention.")


def _headwise_rope_classes():
    """torchtune's rotary embeddings: elementwise per head, so q and k may go through in one call."""
    from torchtune.models.llama3_1._position_embeddings import Llama3ScaledRoPE
    from torchtune.models.qwen2._positional_embeddings import Qwen2RotaryPositionalEmbeddings
    from torchtune.modules import RotaryPositionalEmbeddings

    return (RotaryPositionalEmbeddings, Llama3ScaledRoPE, Qwen2RotaryPositionalEmbeddings)


_HEADWISE_ROPE = _headwise_rope_classes()


def _prefix_attention_forward(self, x, y=None, *, mask=None, input_pos=None):
    """``MultiHeadAttention.forward`` for cached self-attention during generation (see
    :func:`_prefix_attention`); anything else goes to torchtune's forward."""
    state = self._distillm_prefix_state
    cache = self.kv_cache
    if (y is None or cache is None or not self.cache_enabled or state.prefix is None
            or not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool):
        return MultiHeadAttention.forward(self, x, y, mask=mask, input_pos=input_pos)
    # the same projections, positional embeddings and norms as MultiHeadAttention.forward
    b, s_x, _ = x.shape
    s_y = y.shape[1]
    q = self.q_proj(x).view(b, s_x, self.num_heads, self.head_dim)
    k = self.k_proj(y).view(b, s_y, -1, self.head_dim)
    v = self.v_proj(y).view(b, s_y, -1, self.head_dim)
    pos_emb = self.pos_embeddings
    if pos_emb is not None:
        if s_x == s_y and type(pos_emb) in _HEADWISE_ROPE:
            # one call for q and k: the rotation is elementwise per head, so the values are the
            # same as two calls' (about 25 small ops fewer per layer and step)
            qk = pos_emb(torch.cat([q, k], dim=2), input_pos=input_pos)
            q, k = qk[:, :, : self.num_heads], qk[:, :, self.num_heads :]
        else:
            q, k = pos_emb(q, input_pos=input_pos), pos_emb(k, input_pos=input_pos)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if self.q_norm is not None:
        q = self.q_norm(q)
    if self.k_norm is not None:
        k = self.k_norm(k)
    # KVCache.update without its tensor-valued bounds check (a host sync per layer and step): the
    # sampler knows the slot; cache_pos still advances so the cache's own bookkeeping stays valid
    start, n = state.start, state.prefix
    cache.k_cache[:, :, start : start + s_y] = k
    cache.v_cache[:, :, start : start + s_y] = v
    cache.cache_pos.add_(s_y)
    output = F.scaled_dot_product_attention(
        q, cache.k_cache[:, :, :n], cache.v_cache[:, :, :n], attn_mask=state.additive_mask(mask, q.dtype),
        dropout_p=self.attn_dropout if self.training else 0.0,
        enable_gqa=self.num_heads != self.num_kv_heads,
    )
    output = output.transpose(1, 2).contiguous().view(b, s_x, -1)
    return self.output_proj(output)


@contextlib.contextmanager
def _prefix_attention(model: nn.Module):
    """Give the model's plain torchtune ``MultiHeadAttention`` modules :func:`_prefix_attention_forward`
    for the duration; yields the :class:`_PrefixState` the sampler sets before each forward.

    torchtune's forward (0.6.1) expands grouped key/value heads over the whole static cache and
    attends over all ``max_seq_len`` cache slots with a mask every step; the mask is False past the
    last written slot, so attending over the written prefix alone gives the same result.
    Other attention modules (T5's, or any subclass overriding ``forward``) run unchanged.
    """
    state = _PrefixState()
    patched = [m for m in model.modules() if _is_plain_attention(m)]
    try:
        for m in patched:
            m._distillm_prefix_state = state
            m.forward = types.MethodType(_prefix_attention_forward, m)
        yield state
    finally:
        for m in patched:
            vars(m).pop("forward", None)
            vars(m).pop("_distillm_prefix_state", None)


def _last_logits(output) -> torch.Tensor:
    # chunked output / hidden states come as a list; the last element holds the last position
    if isinstance(output, (list, tuple)):
        output = output[-1]
    return output[:, -1].float()


def _cut_at_eos(row: List[int], eos: set) -> List[int]:
    for i, tok in enumerate(row):
        if tok in eos:
            return row[: i + 1]
    return row
