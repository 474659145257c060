"""HF ``T5ForConditionalGeneration`` / ``MT5ForConditionalGeneration`` <-> torchtune T5 keys.

One table (``key_map``) lists every parameter a config implies, with its HF name, torchtune name
and shape; both directions check against it, so a missing, unexpected or wrongly shaped weight is
a ``ValueError`` naming the key before anything is loaded.

HF key forms accepted: hub files (carry ``encoder.embed_tokens`` / ``decoder.embed_tokens`` copies
of ``shared`` and sometimes an unused ``decoder.block.0.layer.1.EncDecAttention
.relative_attention_bias``) and transformers-5 ``save_pretrained`` files (``shared`` only).
``tune_to_hf`` writes what transformers 5 ``save_pretrained`` writes: ``shared.weight`` and, when
untied, ``lm_head.weight``; ``from_pretrained`` ties the embedding aliases itself.
"""

from typing import Any, Dict, Tuple

import torch

from distillm_tune.models._registry import LoRASettings, StateDict
from distillm_tune.models.t5._model_builders import t5_kwargs_from_hf_config

_ATTN = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "output_proj"}
_FF = {"gated-gelu": {"wi_0": "w1", "wi_1": "w3", "wo": "w2"}, "relu": {"wi": "w1", "wo": "w2"}}
_EMBED_ALIASES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# HF declares it unused (``_keys_to_ignore_on_load_unexpected``): cross-attention has no bias.
_IGNORED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def key_map(hf_config: Dict[str, Any]) -> Dict[str, Tuple[str, tuple]]:
    """``{hf_key: (tune_key, shape)}`` for every parameter of the model ``hf_config`` describes."""
    c = t5_kwargs_from_hf_config(hf_config)
    d, inner, vocab = c["d_model"], c["num_heads"] * c["d_kv"], c["vocab_size"]
    m = {"shared.weight": ("tok_embeddings.weight", (vocab, d))}
    ff_shapes = {"w1": (c["d_ff"], d), "w3": (c["d_ff"], d), "w2": (d, c["d_ff"])}
    for stack, n_layers in (("encoder", c["num_layers"]), ("decoder", c["num_decoder_layers"])):
        m[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
            f"{stack}.rel_pos_bias.embedding.weight", (c["relative_attention_num_buckets"], c["num_heads"]))
        for i in range(n_layers):
            hf, tt = f"{stack}.block.{i}.layer", f"{stack}.layers.{i}"
            sublayers = [("0.SelfAttention", "attn", "0", "sa_norm")]
            if stack == "decoder":
                sublayers.append(("1.EncDecAttention", "cross_attn", "1", "ca_norm"))
            for hf_attn, tt_attn, idx, tt_norm in sublayers:
                for h, t in _ATTN.items():
                    shape = (d, inner) if h == "o" else (inner, d)
                    m[f"{hf}.{hf_attn}.{h}.weight"] = (f"{tt}.{tt_attn}.{t}.weight", shape)
                m[f"{hf}.{idx}.layer_norm.weight"] = (f"{tt}.{tt_norm}.scale", (d,))
            ff = len(sublayers)
            for h, t in _FF[c["feed_forward_proj"]].items():
                m[f"{hf}.{ff}.DenseReluDense.{h}.weight"] = (f"{tt}.mlp.{t}.weight", ff_shapes[t])
            m[f"{hf}.{ff}.layer_norm.weight"] = (f"{tt}.mlp_norm.scale", (d,))
        m[f"{stack}.final_layer_norm.weight"] = (f"{stack}.norm.scale", (d,))
    if not c["tie_word_embeddings"]:
        m["lm_head.weight"] = ("output.weight", (vocab, d))
    return m


def _first(keys) -> str:
    return f"{keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)})"


def _check(state_dict: StateDict, expected: Dict[str, tuple], what: str) -> None:
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{what} state dict does not fit the config: missing {_first(missing)}, unexpected {_first(unexpected)}"
        )
    for key, shape in expected.items():
        got = tuple(state_dict[key].shape)
        if got != tuple(shape):
            raise ValueError(f"{what} weight {key!r} has shape {got}, config implies {tuple(shape)}")


def hf_to_tune(state_dict: StateDict, hf_config: Dict[str, Any]) -> StateDict:
    """HF T5/mT5 weights -> torchtune-module state dict (base weights only)."""
    sd = {k: v for k, v in state_dict.items() if k not in _IGNORED}
    for alias in _EMBED_ALIASES:  # copies of ``shared`` (HF ties them on load)
        tensor = sd.pop(alias, None)
        if tensor is not None and "shared.weight" not in sd:
            sd["shared.weight"] = tensor
    m = key_map(hf_config)
    if "lm_head.weight" not in m and "lm_head.weight" in sd:  # tied head: must equal ``shared``
        head = sd.pop("lm_head.weight")
        shared = sd.get("shared.weight")
        if shared is not None and not (head.is_meta or shared.is_meta) and not torch.equal(head, shared):
            raise ValueError(
                "'lm_head.weight' differs from 'shared.weight' but the config implies a tied head "
                "(scale_decoder_outputs / tie_word_embeddings); set tie_word_embeddings false for T5 v1.1"
            )
    _check(sd, {h: shape for h, (_, shape) in m.items()}, "HF T5")
    return {t: sd[h] for h, (t, _) in m.items()}


def tune_to_hf(state_dict: StateDict, hf_config: Dict[str, Any]) -> StateDict:
    """torchtune T5 state dict (LoRA merged) -> what ``T5ForConditionalGeneration`` loads."""
    lora = [k for k in state_dict if ".lora_a." in k or ".lora_b." in k]
    if lora:
        raise ValueError(
            f"LoRA weights {lora[:4]} must be merged first (torchtune.modules.peft.get_merged_lora_ckpt)"
        )
    m = key_map(hf_config)
    _check(state_dict, {t: shape for _, (t, shape) in m.items()}, "torchtune T5")
    return {h: state_dict[t] for h, (t, _) in m.items()}


def lora_to_peft(state_dict: StateDict, hf_config: Dict[str, Any], lora: LoRASettings) -> tuple:
    """torchtune ``*.lora_{a,b}.weight`` -> PEFT ``base_model.model.<hf module>.lora_{A,B}.weight``,
    plus ``target_modules`` (HF leaf names such as "q", "o", "wi_0", "lm_head"; LoRA is applied to
    every matching module of both stacks, as PEFT's suffix matching does)."""
    module_of = {t[: -len(".weight")]: h[: -len(".weight")] for h, (t, _) in key_map(hf_config).items()}
    peft, targets = {}, set()
    for key, tensor in state_dict.items():
        for tt_part, peft_part in ((".lora_a.weight", ".lora_A.weight"), (".lora_b.weight", ".lora_B.weight")):
            if key.endswith(tt_part):
                module = key[: -len(tt_part)]
                if module not in module_of:
                    raise ValueError(f"LoRA key {key!r} names no T5 projection {module!r}")
                peft[f"base_model.model.{module_of[module]}{peft_part}"] = tensor
                targets.add(module_of[module].rsplit(".", 1)[-1])
    if not peft:
        raise ValueError("no '*.lora_a.weight' / '*.lora_b.weight' entries in the state dict")
    return peft, sorted(targets)
