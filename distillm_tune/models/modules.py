"""Pieces torchtune 0.6.1 lacks for GPT-2 and OPT, kept as subclasses of its own classes.

Why subclasses: ``TransformerDecoder.setup_caches``, torchtune's generation utilities, FSDP and
activation-checkpointing wrap policies find the decoder and its layers with ``isinstance``; a
subclass keeps all of that working while changing only what differs.

- :class:`LearnedPositionDecoder`: ``TransformerDecoder.forward`` embeds tokens without positions,
  so learned absolute position tables (GPT-2, OPT) need a decoder that adds them from ``input_pos``.
  It also carries OPT's ``project_in`` / ``project_out`` (``word_embed_proj_dim != hidden``).
- :class:`PostNormSelfAttentionLayer`: torchtune's layer is pre-norm only; OPT-350m is post-norm.
- :func:`learned_position_decoder`: the one builder GPT-2 and OPT share (they differ only in
  activation, norm placement, position offset and the embedding projections).
- :func:`check_state_dict`: the converters' one error path (unexpected / missing / mis-shaped keys);
  :func:`drop_tied_head`: their check that a checkpoint's ``lm_head`` really is the embedding.
"""

from typing import Dict, List, Optional, Union

import torch
from torch import nn
from torchtune.modules import (
    FeedForward,
    MultiHeadAttention,
    TiedLinear,
    TransformerDecoder,
    TransformerSelfAttentionLayer,
)
from torchtune.modules.peft import LoRALinear

from distillm_tune.models._registry import LoRASettings

# HF ``activation_function`` names -> modules. The tanh-approximate GELUs ("gelu_new", GPT-2's
# default) agree with torch's ``approximate="tanh"`` to float rounding.
_ACTIVATIONS = {
    "gelu_new": lambda: nn.GELU(approximate="tanh"),
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
    "gelu_fast": lambda: nn.GELU(approximate="tanh"),
    "gelu": lambda: nn.GELU(),
    "relu": lambda: nn.ReLU(),
}
LORA_ATTN_MODULES = ("q_proj", "k_proj", "v_proj", "output_proj")


def activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"activation_function {name!r} is not supported; expected one of {sorted(_ACTIVATIONS)}"
        )
    return _ACTIVATIONS[name]()


class LearnedPositionDecoder(TransformerDecoder):
    """``TransformerDecoder`` plus a learned absolute position table.

    ``h = project_in(tok_embeddings(tokens)) + pos_embeddings(input_pos + pos_offset)``; after the
    layers, ``output(project_out(norm(h)))``. ``input_pos`` is reshaped to ``(-1, seq)`` so that
    ``[s]`` (shared positions), ``[b, s]`` (left-padded prompts) and ``[b]`` (one decode step per
    sequence, as torchtune's ``generate`` passes it) all broadcast over the batch correctly.
    ``pos_offset`` is 2 for OPT, whose table starts two rows late.

    Code that turns final hidden states into logits itself (e.g. a fused loss) must go through
    :meth:`unembed` (or ``norm`` -> ``project_out`` -> ``output``): OPT-350m's ``project_out``
    sits between the last layer and the tied head.
    """

    def __init__(
        self,
        *,
        pos_embeddings: nn.Embedding,
        pos_offset: int = 0,
        project_in: Optional[nn.Module] = None,
        project_out: Optional[nn.Module] = None,
        embed_dropout: float = 0.0,
        **decoder_kwargs,
    ) -> None:
        super().__init__(**decoder_kwargs)
        self.pos_embeddings = pos_embeddings
        self.pos_offset = pos_offset
        self.project_in = project_in
        self.project_out = project_out
        self.embed_dropout = nn.Dropout(embed_dropout)

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        encoder_input: Optional[torch.Tensor] = None,
        encoder_mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
    ) -> Union[torch.Tensor, List[torch.Tensor]]:
        seq_len = tokens.shape[1]
        self._validate_inputs(
            seq_len, mask=mask, encoder_input=encoder_input, encoder_mask=encoder_mask,
            input_pos=input_pos,
        )
        pos = input_pos if input_pos is not None else torch.arange(seq_len, device=tokens.device)
        h = self.tok_embeddings(tokens)
        if self.project_in is not None:
            h = self.project_in(h)
        h = self.embed_dropout(h + self.pos_embeddings(pos.reshape(-1, seq_len) + self.pos_offset))

        hidden = []
        for i, layer in enumerate(self.layers):
            if i in self.output_hidden_states:
                hidden.append(h)
            h = layer(h, mask=mask, encoder_input=encoder_input, encoder_mask=encoder_mask,
                      input_pos=input_pos)
        output = self.unembed(h)
        return output if not hidden else [*hidden, output]

    def unembed(self, h: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        h = self.norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        if self.num_output_chunks > 0:
            return self.chunked_output(h)
        return self.output(h).float()


class PostNormSelfAttentionLayer(TransformerSelfAttentionLayer):
    """Post-norm block (OPT-350m): ``x = sa_norm(x + attn(x)); x = mlp_norm(x + mlp(x))``.

    Same submodules and state-dict names as the pre-norm parent, so caches, wrap policies and
    weight converters treat both alike. ``sa_scale``/``mlp_scale`` hold residual dropout.
    """

    def forward(
        self,
        x: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        input_pos: Optional[torch.Tensor] = None,
        **kwargs: Dict,
    ) -> torch.Tensor:
        h = self.sa_norm(x + self.sa_scale(self.attn(x, x, mask=mask, input_pos=input_pos)))
        return self.mlp_norm(h + self.mlp_scale(self.mlp(h)))


def _linear(in_dim: int, out_dim: int, lora: Optional[LoRASettings], adapt: bool) -> nn.Module:
    """A biased linear layer, or its LoRA version when ``adapt`` (HF keys stay ``weight``/``bias``)."""
    if lora is not None and adapt:
        return LoRALinear(in_dim, out_dim, rank=lora.lora_rank, alpha=lora.lora_alpha,
                          dropout=lora.lora_dropout, use_bias=True)
    return nn.Linear(in_dim, out_dim, bias=True)


def validate_lora(lora: Optional[LoRASettings]) -> None:
    """Reject LoRA settings these tied-head families cannot honour, before any work is done."""
    if lora is None:
        return
    bad = [m for m in lora.lora_attn_modules if m not in LORA_ATTN_MODULES]
    if bad:
        raise ValueError(f"lora_attn_modules {bad} are not supported; expected a subset of "
                         f"{list(LORA_ATTN_MODULES)}")
    if lora.apply_lora_to_output:
        raise ValueError("apply_lora_to_output=True is not supported: the output head is tied to "
                         "the token embeddings (TiedLinear), so it has no weight of its own to adapt")


def learned_position_decoder(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    activation_name: str,
    norm_eps: float = 1e-5,
    pre_norm: bool = True,
    final_norm: bool = True,
    pos_offset: int = 0,
    word_embed_dim: Optional[int] = None,
    attn_dropout: float = 0.0,
    resid_dropout: float = 0.0,
    embed_dropout: float = 0.0,
    lora: Optional[LoRASettings] = None,
) -> LearnedPositionDecoder:
    """GPT-2 / OPT style decoder: biased q/k/v/o and 2-layer MLP, LayerNorms, tied output head.

    ``word_embed_dim`` (OPT's ``word_embed_proj_dim``), when it differs from ``embed_dim``, sizes
    the token table and adds bias-free ``project_in``/``project_out``. ``lora`` (optional) turns
    the chosen projections into ``LoRALinear`` as torchtune's ``lora_llama2`` does.
    """
    validate_lora(lora)
    if embed_dim % num_heads:
        raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
    head_dim = embed_dim // num_heads
    attn_mods = lora.lora_attn_modules if lora is not None else ()
    lora_mlp = lora is not None and lora.apply_lora_to_mlp
    layer_cls = TransformerSelfAttentionLayer if pre_norm else PostNormSelfAttentionLayer

    layers = nn.ModuleList()
    for _ in range(num_layers):
        attn = MultiHeadAttention(
            embed_dim=embed_dim,
            num_heads=num_heads,
            num_kv_heads=num_heads,
            head_dim=head_dim,
            q_proj=_linear(embed_dim, embed_dim, lora, "q_proj" in attn_mods),
            k_proj=_linear(embed_dim, embed_dim, lora, "k_proj" in attn_mods),
            v_proj=_linear(embed_dim, embed_dim, lora, "v_proj" in attn_mods),
            output_proj=_linear(embed_dim, embed_dim, lora, "output_proj" in attn_mods),
            max_seq_len=max_seq_len,
            attn_dropout=attn_dropout,
        )
        mlp = FeedForward(
            gate_proj=_linear(embed_dim, intermediate_dim, lora, lora_mlp),
            down_proj=_linear(intermediate_dim, embed_dim, lora, lora_mlp),
            activation=activation(activation_name),
        )
        layers.append(layer_cls(
            attn=attn,
            mlp=mlp,
            sa_norm=nn.LayerNorm(embed_dim, eps=norm_eps),
            mlp_norm=nn.LayerNorm(embed_dim, eps=norm_eps),
            sa_scale=nn.Dropout(resid_dropout),
            mlp_scale=nn.Dropout(resid_dropout),
        ))

    word_dim = word_embed_dim or embed_dim
    projected = word_dim != embed_dim
    tok_embeddings = nn.Embedding(vocab_size, word_dim)
    return LearnedPositionDecoder(
        tok_embeddings=tok_embeddings,
        pos_embeddings=nn.Embedding(max_seq_len + pos_offset, embed_dim),
        pos_offset=pos_offset,
        project_in=nn.Linear(word_dim, embed_dim, bias=False) if projected else None,
        project_out=nn.Linear(embed_dim, word_dim, bias=False) if projected else None,
        embed_dropout=embed_dropout,
        layers=layers,
        max_seq_len=max_seq_len,
        num_heads=num_heads,
        head_dim=head_dim,
        norm=nn.LayerNorm(embed_dim, eps=norm_eps) if final_norm else nn.Identity(),
        output=TiedLinear(tok_embeddings),
    )


def drop_tied_head(state_dict: Dict[str, torch.Tensor], embed_key: str, what: str) -> None:
    """Remove ``lm_head.weight`` from ``state_dict``; raise ValueError if it is not a copy of the
    ``embed_key`` table (meta tensors are not compared)."""
    head = state_dict.pop("lm_head.weight", None)
    emb = state_dict.get(embed_key)
    if head is not None and emb is not None and head.device.type != "meta" and not torch.equal(head, emb):
        raise ValueError(f"{what} checkpoint has an lm_head.weight that differs from {embed_key}; "
                         "only tied output heads are supported")


def check_state_dict(given: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor],
                     what: str) -> None:
    """Raise one ValueError naming every unexpected, missing or mis-shaped key of ``given``.

    ``expected`` holds tensors of the right shapes (e.g. from a model built under
    ``torch.device("meta")``), so converters check checkpoints against the config before any
    tensor is touched, in the key names the checkpoint itself uses.
    """
    problems = []
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    missing = sorted(set(expected) - set(given))
    if missing:
        problems.append(f"missing keys {missing}")
    for key in sorted(set(expected) & set(given)):
        if tuple(given[key].shape) != tuple(expected[key].shape):
            problems.append(f"{key}: checkpoint shape {tuple(given[key].shape)} but the config "
                            f"implies {tuple(expected[key].shape)}")
    if problems:
        raise ValueError(f"{what} does not fit its config: " + "; ".join(problems))
