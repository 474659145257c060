"""Llama weights between HF (``LlamaForCausalLM``) and torchtune's ``llama2`` modules.

The heavy lifting is torchtune's ``convert_weights.hf_to_tune`` / ``tune_to_hf``: they rename keys
and permute the q/k rows between HF's rotate-half RoPE layout and torchtune's interleaved one.
This module adds what they lack: key forms other than the hub's (no ``model.`` prefix),
``ValueError``s that name a bad key instead of a bare ``Exception``, and the PEFT export, where
``lora_b`` of q/k must get the same row permutation as the base weight (``lora_a`` acts on the
input side, which is not permuted).
"""

from typing import Any, Dict, Tuple

import torch
from torchtune.models import convert_weights as tt_convert

from distillm_tune.models._registry import LoRASettings, StateDict
from distillm_tune.models.llama._model_builders import llama_args_from_hf

# torchtune module name -> HF module path under a decoder layer (or the model root for "output").
_TUNE_TO_HF_MODULE = {
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.output_proj": "self_attn.o_proj",
    "mlp.w1": "mlp.gate_proj",
    "mlp.w2": "mlp.down_proj",
    "mlp.w3": "mlp.up_proj",
}


def _dims(hf_config: Dict[str, Any]) -> Dict[str, int]:
    args = llama_args_from_hf(hf_config)
    return dict(
        num_heads=args["num_heads"],
        num_kv_heads=args["num_kv_heads"],
        dim=args["embed_dim"],
        head_dim=args["embed_dim"] // args["num_heads"],
    )


def _hub_key(key: str) -> str:
    """Bring any key form to the hub form ``model.layers...`` / ``lm_head.weight`` that torchtune's
    mapping table knows (a bare ``LlamaModel`` save has no ``model.`` prefix)."""
    if key.startswith("model.") or key.startswith("lm_head."):
        return key
    return "model." + key


def _is_buffer(key: str) -> bool:
    return "rotary_emb.inv_freq" in key


def hf_to_tune(hf_state_dict: StateDict, hf_config: Dict[str, Any]) -> StateDict:
    """HF Llama state dict -> torchtune ``llama2`` state dict (q/k permuted, buffers dropped)."""
    hub_sd = {}
    for key, value in hf_state_dict.items():
        if _is_buffer(key):
            continue
        hub = _hub_key(key)
        try:
            tt_convert.get_mapped_key(hub, tt_convert._FROM_HF)
        except Exception:
            raise ValueError(f"unexpected key {key!r} in a Llama checkpoint") from None
        hub_sd[hub] = value
    return tt_convert.hf_to_tune(hub_sd, **_dims(hf_config))


def tune_to_hf(tune_state_dict: StateDict, hf_config: Dict[str, Any]) -> StateDict:
    """torchtune ``llama2`` state dict (LoRA merged) -> what ``LlamaForCausalLM`` loads."""
    for key in tune_state_dict:
        if "lora_" in key or key.endswith(".magnitude"):
            raise ValueError(f"{key!r} is an adapter weight; merge LoRA before tune_to_hf")
    inverse = {v: k for k, v in tt_convert._FROM_HF.items() if v is not None}
    for key in tune_state_dict:
        try:
            tt_convert.get_mapped_key(key, inverse)
        except Exception:
            raise ValueError(f"unexpected key {key!r} in a torchtune Llama state dict") from None
    return tt_convert.tune_to_hf(dict(tune_state_dict), **_dims(hf_config))


def _permute_rows_to_hf(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """torchtune's interleaved RoPE row order -> HF's rotate-half order, for any column count
    (the base weight has ``dim`` columns, ``lora_b`` has ``rank``)."""
    cols = t.shape[-1]
    return t.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(n_heads * head_dim, cols)


def _split_lora_key(key: str) -> Tuple[str, str]:
    """``layers.0.attn.q_proj.lora_a.weight`` -> (``layers.0.attn.q_proj``, ``lora_a``)."""
    parts = key.split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in ("lora_a", "lora_b"):
        raise ValueError(
            f"{key!r} is not a LoRA weight of the form <module>.lora_a.weight / .lora_b.weight "
            "(DoRA magnitudes cannot be exported to PEFT LoRA)"
        )
    return ".".join(parts[:-2]), parts[-2]


def _hf_module(tune_module: str) -> str:
    """torchtune module path -> HF module path inside ``LlamaForCausalLM``."""
    if tune_module == "output":
        return "lm_head"
    parts = tune_module.split(".")
    inner = ".".join(parts[2:])
    if parts[0] != "layers" or inner not in _TUNE_TO_HF_MODULE:
        raise ValueError(f"no HF Llama module corresponds to torchtune module {tune_module!r}")
    return f"model.layers.{parts[1]}.{_TUNE_TO_HF_MODULE[inner]}"


def lora_to_peft(
    lora_state_dict: StateDict, hf_config: Dict[str, Any], lora: LoRASettings
) -> Tuple[StateDict, list]:
    """torchtune LoRA weights -> PEFT ``base_model.model.<hf module>.lora_A/B.weight`` + target
    modules. Same scaling convention on both sides (alpha / rank), so values copy unchanged except
    for the q/k ``lora_b`` row permutation."""
    dims = _dims(hf_config)
    peft_sd, targets = {}, set()
    for key, value in lora_state_dict.items():
        module, which = _split_lora_key(key)
        hf_module = _hf_module(module)
        if which == "lora_b" and module.endswith("attn.q_proj"):
            value = _permute_rows_to_hf(value, dims["num_heads"], dims["head_dim"])
        elif which == "lora_b" and module.endswith("attn.k_proj"):
            value = _permute_rows_to_hf(value, dims["num_kv_heads"], dims["head_dim"])
        peft_name = "lora_A" if which == "lora_a" else "lora_B"
        peft_sd[f"base_model.model.{hf_module}.{peft_name}.weight"] = value.contiguous()
        targets.add(hf_module.split(".")[-1])
    return peft_sd, sorted(targets)
