"""How samples meet a model: decoder-only and encoder-decoder behind one small interface.

The recipe works on samples ``{"prompt": ids, "response": ids}`` whatever the architecture —
the replay buffer stores them, the sampler returns them. For T5 the prompt is the encoder input
and the response the decoder target. These classes do the three things that differ: turning
samples into a batch, running a model on a batch, and generating responses.
"""

from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torchtune.modules import TiedLinear, TransformerSelfAttentionLayer

from distillm_tune.data.collate import collate_prompt_response
from distillm_tune.data.seq2seq import collate_seq2seq
from distillm_tune.models.t5 import T5DecoderLayer, generate_seq2seq
from distillm_tune.models.tokenizer import stop_ids
from distillm_tune.sgo import generate_responses

Sample = Dict[str, List[int]]

# Layers that FSDP shards and activation checkpointing wraps, for every ported family.
LAYER_CLASSES = (TransformerSelfAttentionLayer, T5DecoderLayer)


class CausalLMIO:
    """Decoder-only models: the response continues the prompt in one sequence."""

    is_encoder_decoder = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def sample(self, item: Dict[str, Any]) -> Sample:
        return item

    def references(self, dataset, index: int) -> List[str]:
        return list(dataset.examples[index].references)

    def collate(self, samples: List[Sample]) -> Dict[str, Any]:
        return collate_prompt_response(samples, pad_id=self.tokenizer.pad_id)

    def prepare(self, model: nn.Module, num_output_chunks: int) -> None:
        if num_output_chunks > 0:
            model.set_num_output_chunks(num_output_chunks)

    def forward(self, model: nn.Module, batch: Dict[str, Any], device: torch.device):
        return model(batch["tokens"].to(device))

    def forward_hidden(self, model: nn.Module, batch: Dict[str, Any], device: torch.device):
        """``(hidden [B, S, H], weight [V, H], bias or None)``: the input of the output projection
        and the projection itself, so that a loss can apply it chunk by chunk
        (``FusedLinearDivergence``) instead of receiving the ``[B, S, V]`` logits. Under FSDP the
        weight returned is the sharded parameter (read outside the forward); ``forward_loss``
        reads it whole."""
        weight, bias = output_projection(model)
        hidden = self.forward_loss(model, batch, device, lambda h, w, b: h)
        return hidden, weight, bias

    def forward_loss(self, model: nn.Module, batch: Dict[str, Any], device: torch.device,
                     loss_of_hidden: Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], Any]):
        """The model's forward with its head replaced by ``loss_of_hidden(hidden [B, S, H],
        weight [V, H], bias or None)``, whose result the forward returns. The loss runs inside the
        model's own forward: under FSDP2 the root module's pre-forward hook has all-gathered the
        parameters that are not in a layer (embeddings, final norm, head; a tied head is the
        embedding), so ``weight`` is the whole head, and the root's backward hooks reduce-scatter
        its gradient; on one process it is the plain parameter."""

        def head(h: torch.Tensor):
            h = model.norm(h)
            project_out = getattr(model, "project_out", None)  # OPT-350m: 1024 -> 512 before the head
            h = h if project_out is None else project_out(h)
            return loss_of_hidden(h, *output_projection(model))

        # The decoders end with ``self.unembed(h)``; an instance attribute shadows that method for
        # this one call, so everything before the head runs exactly as in ``forward``.
        model.unembed = head
        try:
            return model(batch["tokens"].to(device))
        finally:
            del model.unembed

    def generate(self, model: nn.Module, samples: List[Sample], *, max_new_tokens: int,
                 generator: Optional[torch.Generator], dtype: torch.dtype, device: torch.device,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: Optional[int] = None,
                 pack_weights: bool = True) -> List[Sample]:
        # the sampler wants plain [B, 1, V] logits, not torchtune's list of chunks
        chunks = model.num_output_chunks
        model.set_num_output_chunks(0)
        try:
            return generate_responses(
                model, [s["prompt"] for s in samples], max_new_tokens=max_new_tokens,
                eos_ids=stop_ids(self.tokenizer), pad_id=self.tokenizer.pad_id, temperature=temperature,
                top_p=top_p, top_k=top_k, generator=generator, cache_dtype=dtype, device=device,
                pack_weights=pack_weights,
            )
        finally:
            model.set_num_output_chunks(chunks)


def output_projection(model: nn.Module):
    """``(weight [V, H], bias or None)`` of a decoder's output layer: its own ``nn.Linear`` or the
    token embedding it is tied to (GPT-2, OPT)."""
    out = model.output
    if getattr(out, "softcap", None) is not None:  # models.native.SoftCappedTiedLinear (Gemma 2)
        raise ValueError("the model's logits are soft-capped (config.json final_logit_softcapping): "
                         "a fused loss over hidden states and the head weight would skip the capping; "
                         "unset fused_loss_chunk_size")
    if isinstance(out, TiedLinear):
        return out.tied_module.weight, None
    if isinstance(out, nn.Linear):
        return out.weight, out.bias
    raise ValueError(f"the model's output layer is a {type(out).__name__}, not a plain or tied linear "
                     "layer (LoRA on the output layer?): the fused loss needs its weight")


class Seq2SeqLMIO:
    """Encoder-decoder models (T5/mT5): the prompt is the encoder input, the response the target."""

    is_encoder_decoder = True

    def __init__(self, tokenizer, decoder_start_id: int = 0):
        self.tokenizer = tokenizer
        self.decoder_start_id = decoder_start_id

    def sample(self, item: Dict[str, Any]) -> Sample:
        return {"prompt": item["source"], "response": item["target"]}

    def references(self, dataset, index: int) -> List[str]:
        return [dataset.target_texts[index]]

    def collate(self, samples: List[Sample]) -> Dict[str, Any]:
        return collate_seq2seq(
            [{"source": s["prompt"], "target": s["response"]} for s in samples],
            pad_id=self.tokenizer.pad_id, decoder_start_id=self.decoder_start_id,
        )

    def prepare(self, model: nn.Module, num_output_chunks: int) -> None:
        pass  # T5 returns dense logits; the losses take them as one chunk

    def forward(self, model: nn.Module, batch: Dict[str, Any], device: torch.device):
        return model(batch["input_ids"].to(device), batch["decoder_input_ids"].to(device),
                     batch["encoder_padding_mask"].to(device))

    def generate(self, model: nn.Module, samples: List[Sample], *, max_new_tokens: int,
                 generator: Optional[torch.Generator], dtype: torch.dtype, device: torch.device,
                 temperature: float = 1.0, top_p: float = 1.0, top_k: Optional[int] = None,
                 pack_weights: bool = True) -> List[Sample]:
        batch = self.collate([{"prompt": s["prompt"], "response": [self.tokenizer.eos_id]} for s in samples])
        out = generate_seq2seq(
            model, batch["input_ids"].to(device), batch["encoder_padding_mask"].to(device),
            max_new_tokens=max_new_tokens, decoder_start_token_id=self.decoder_start_id,
            eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id, temperature=temperature,
            top_k=top_k, top_p=top_p, generator=generator, cache_dtype=dtype, pack_weights=pack_weights,
        ).tolist()
        eos = self.tokenizer.eos_id
        # keep the EOS the student produced; a row without one keeps all its tokens
        responses = [row[: row.index(eos) + 1] if eos in row else row for row in out]
        return [{"prompt": list(s["prompt"]), "response": r} for s, r in zip(samples, responses)]


def model_io_for(family, tokenizer, hf_config: Dict[str, Any]):
    if family.is_encoder_decoder:
        return Seq2SeqLMIO(tokenizer, int(hf_config.get("decoder_start_token_id", tokenizer.pad_id) or 0))
    return CausalLMIO(tokenizer)
