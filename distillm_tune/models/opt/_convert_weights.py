"""OPT weights: HF <-> torchtune, and torchtune LoRA -> PEFT adapter.

OPT uses plain ``nn.Linear`` (no transposes, no fused projections), so conversion is renaming.
Key prefixes vary: hub files use ``decoder.*``, transformers-5 ``save_pretrained`` writes
``model.decoder.*`` and no ``lm_head`` (tied to ``embed_tokens``).
"""

import re
from typing import Any, Dict, List, Tuple

import torch

from distillm_tune.models._registry import LoRASettings, StateDict
from distillm_tune.models.modules import check_state_dict, drop_tied_head

_PREFIXES = ("model.decoder.", "decoder.")
_OUT_PREFIX = "model.decoder."
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL = {
    "embed_tokens.weight": "tok_embeddings.weight",
    "embed_positions.weight": "pos_embeddings.weight",
    "project_in.weight": "project_in.weight",
    "project_out.weight": "project_out.weight",
    "final_layer_norm.weight": "norm.weight",
    "final_layer_norm.bias": "norm.bias",
}
# HF module inside decoder.layers.{i} -> torchtune module inside layers.{i}.
_MODULES = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.output_proj",
    "self_attn_layer_norm": "sa_norm",
    "final_layer_norm": "mlp_norm",
    "fc1": "mlp.w1",
    "fc2": "mlp.w2",
}
# torchtune LoRA module -> HF module name for PEFT (same order as _MODULES).
_LORA_ATTN = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj",
              "v_proj": "self_attn.v_proj", "output_proj": "self_attn.out_proj"}
_LORA_MLP = {"w1": "fc1", "w2": "fc2"}


def _normalise_hf(state_dict: StateDict) -> StateDict:
    """One key form: no ``model.decoder.``/``decoder.`` prefix, no tied ``lm_head``."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    drop_tied_head(out, "embed_tokens.weight", "OPT")
    return out


def _rename(sd: StateDict, global_map: Dict[str, str], module_map: Dict[str, str], prefix: str) -> StateDict:
    out = {}
    for key, value in sd.items():
        if key in global_map:
            out[prefix + global_map[key]] = value
        else:
            layer, module, param = _LAYER.match(key).groups()
            out[f"{prefix}layers.{layer}.{module_map[module]}.{param}"] = value
    return out


def _reference_tune_state_dict(config: Dict[str, Any]) -> StateDict:
    """Shapes the config implies, from a model built on the meta device (no memory, no init)."""
    from distillm_tune.models.opt._model_builders import opt_from_hf_config

    with torch.device("meta"):
        return opt_from_hf_config(config).state_dict()


def _tune_to_hf_unchecked(sd: StateDict) -> StateDict:
    return _rename(sd, {v: k for k, v in _GLOBAL.items()}, {v: k for k, v in _MODULES.items()},
                   _OUT_PREFIX)


def hf_to_tune(state_dict: StateDict, config: Dict[str, Any]) -> StateDict:
    """HF OPT state dict (any key form) -> torchtune state dict for ``opt_from_hf_config(config)``.

    Raises ValueError naming unexpected, missing and mis-shaped HF keys before converting.
    """
    sd = _normalise_hf(state_dict)
    expected = _normalise_hf(_tune_to_hf_unchecked(_reference_tune_state_dict(config)))
    check_state_dict(sd, expected, "OPT checkpoint")
    return _rename(sd, _GLOBAL, _MODULES, "")


def tune_to_hf(state_dict: StateDict, config: Dict[str, Any]) -> StateDict:
    """torchtune OPT state dict (LoRA merged) -> transformers-5 ``save_pretrained`` key form:
    ``model.decoder.*`` keys, no ``lm_head.weight`` (tied; ``from_pretrained`` re-ties it)."""
    check_state_dict(state_dict, _reference_tune_state_dict(config), "OPT torchtune state dict")
    return _tune_to_hf_unchecked(state_dict)


def lora_to_peft(lora_state_dict: StateDict, config: Dict[str, Any],
                 lora: LoRASettings) -> Tuple[StateDict, List[str], Dict[str, Any]]:
    """torchtune LoRA weights -> PEFT adapter for ``OPTForCausalLM``.

    Returns ``(peft_state_dict, target_modules, extra_config)``. Names map 1:1 (q_proj, k_proj,
    v_proj, out_proj, fc1, fc2) and both libraries scale by ``alpha / r`` with ``lora_a``/
    ``lora_A`` ``[r, in]`` and ``lora_b``/``lora_B`` ``[out, r]``, so tensors are copied as they
    are and ``extra_config`` is empty (``r=lora.lora_rank``, ``lora_alpha=lora.lora_alpha``).
    Accepts a full LoRA-model state dict: only ``*.lora_a.weight``/``*.lora_b.weight`` are read.
    """
    ab = {k: v for k, v in lora_state_dict.items() if ".lora_a." in k or ".lora_b." in k}
    modules = {f"attn.{m}": _LORA_ATTN[m] for m in lora.lora_attn_modules}
    if lora.apply_lora_to_mlp:
        modules.update({f"mlp.{m}": hf for m, hf in _LORA_MLP.items()})
    out = {}
    for i in range(config["num_hidden_layers"]):
        for tune_name, hf_name in modules.items():
            for tune_ab, peft_ab in (("lora_a", "lora_A"), ("lora_b", "lora_B")):
                key = f"layers.{i}.{tune_name}.{tune_ab}.weight"
                if key not in ab:
                    raise ValueError(f"LoRA weight {key!r} is missing; the LoRA settings {lora} expect it")
                out[f"base_model.model.model.decoder.layers.{i}.{hf_name}.{peft_ab}.weight"] = ab.pop(key)
    if ab:
        raise ValueError(f"LoRA weights {sorted(ab)} have no OPT PEFT equivalent under settings {lora}")
    target_modules = [hf.split(".")[-1] for hf in modules.values()]
    return {k: v.contiguous() for k, v in out.items()}, target_modules, {}
