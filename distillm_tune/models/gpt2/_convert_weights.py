"""GPT-2 weights: HF <-> torchtune, and torchtune LoRA -> PEFT adapter.

HF GPT-2 quirks handled here (MODEL_PORTS.md): ``Conv1D`` stores weights ``[in, out]``
(transpose); ``attn.c_attn`` fuses q, k, v along ``out`` (split / concatenate in that order);
hub files have no ``transformer.`` prefix and carry ``attn.bias`` / ``attn.masked_bias`` buffers,
transformers-5 ``save_pretrained`` writes the prefix and no ``lm_head`` (tied).
"""

import re
from typing import Any, Dict, List, Tuple

import torch

from distillm_tune.models._registry import LoRASettings, StateDict
from distillm_tune.models.modules import check_state_dict, drop_tied_head

_PREFIX = "transformer."
_BUFFER = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")
_LAYER = re.compile(r"^h\.(\d+)\.(.+)\.(weight|bias)$")
_TUNE_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_GLOBAL = {
    "wte.weight": "tok_embeddings.weight",
    "wpe.weight": "pos_embeddings.weight",
    "ln_f.weight": "norm.weight",
    "ln_f.bias": "norm.bias",
}
# HF module inside block h.{i} -> torchtune module inside layers.{i} (c_attn is split separately).
_MODULES = {
    "ln_1": "sa_norm",
    "ln_2": "mlp_norm",
    "attn.c_proj": "attn.output_proj",
    "mlp.c_fc": "mlp.w1",
    "mlp.c_proj": "mlp.w2",
}
_CONV1D = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")


def _normalise_hf(state_dict: StateDict) -> StateDict:
    """One key form: no ``transformer.`` prefix, no attention-mask buffers, no tied ``lm_head``."""
    out = {}
    for key, value in state_dict.items():
        key = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if not _BUFFER.match(key):
            out[key] = value
    drop_tied_head(out, "wte.weight", "GPT-2")
    return out


def _hf_to_tune_unchecked(sd: StateDict) -> StateDict:
    out = {}
    for key, value in sd.items():
        if key in _GLOBAL:
            out[_GLOBAL[key]] = value
            continue
        layer, module, param = _LAYER.match(key).groups()
        if module in _CONV1D and param == "weight":
            value = value.t()
        if module == "attn.c_attn":
            for name, part in zip(_QKV, value.chunk(3, dim=0)):
                out[f"layers.{layer}.attn.{name}.{param}"] = part.contiguous()
        else:
            out[f"layers.{layer}.{_MODULES[module]}.{param}"] = value.contiguous()
    return out


def _tune_to_hf_unchecked(sd: StateDict) -> StateDict:
    inverse_global = {v: k for k, v in _GLOBAL.items()}
    inverse_modules = {v: k for k, v in _MODULES.items()}
    out, qkv = {}, {}
    for key, value in sd.items():
        if key in inverse_global:
            out[_PREFIX + inverse_global[key]] = value
            continue
        layer, module, param = _TUNE_LAYER.match(key).groups()
        if module.startswith("attn.") and module[5:] in _QKV:
            qkv.setdefault((layer, param), {})[module[5:]] = value
            continue
        hf_module = inverse_modules[module]
        if hf_module in _CONV1D and param == "weight":
            value = value.t()
        out[f"{_PREFIX}h.{layer}.{hf_module}.{param}"] = value.contiguous()
    for (layer, param), parts in qkv.items():
        fused = torch.cat([parts[n] for n in _QKV], dim=0)
        out[f"{_PREFIX}h.{layer}.attn.c_attn.{param}"] = (fused.t() if param == "weight" else fused).contiguous()
    return out


def _reference_tune_state_dict(config: Dict[str, Any]) -> StateDict:
    """Shapes the config implies, from a model built on the meta device (no memory, no init)."""
    from distillm_tune.models.gpt2._model_builders import gpt2_from_hf_config

    with torch.device("meta"):
        return gpt2_from_hf_config(config).state_dict()


def hf_to_tune(state_dict: StateDict, config: Dict[str, Any]) -> StateDict:
    """HF GPT-2 state dict (any key form) -> torchtune state dict for ``gpt2_from_hf_config(config)``.

    Raises ValueError naming unexpected, missing and mis-shaped HF keys before converting.
    """
    sd = _normalise_hf(state_dict)
    expected = {k[len(_PREFIX):]: v for k, v in
                _tune_to_hf_unchecked(_reference_tune_state_dict(config)).items()}
    check_state_dict(sd, expected, "GPT-2 checkpoint")
    return _hf_to_tune_unchecked(sd)


def tune_to_hf(state_dict: StateDict, config: Dict[str, Any]) -> StateDict:
    """torchtune GPT-2 state dict (LoRA merged) -> transformers-5 ``save_pretrained`` key form:
    ``transformer.*`` keys, no ``lm_head.weight`` (tied: ``from_pretrained`` re-ties it, and
    safetensors cannot store the same tensor twice)."""
    check_state_dict(state_dict, _reference_tune_state_dict(config), "GPT-2 torchtune state dict")
    return _tune_to_hf_unchecked(state_dict)


def lora_to_peft(lora_state_dict: StateDict, config: Dict[str, Any],
                 lora: LoRASettings) -> Tuple[StateDict, List[str], Dict[str, Any]]:
    """torchtune LoRA weights -> PEFT adapter for ``GPT2LMHeadModel``.

    Returns ``(peft_state_dict, target_modules, extra_config)``; ``extra_config`` must be merged
    into ``adapter_config.json`` next to ``r=lora.lora_rank``, ``lora_alpha=lora.lora_alpha``:

    - ``fan_in_fan_out=True``: HF ``Conv1D`` stores ``[in, out]``. PEFT's ``lora_A`` is still
      ``[r, in]`` and ``lora_B`` ``[out, r]``, the same layout as torchtune's ``lora_a``/``lora_b``.
    - q/k/v are one fused ``c_attn`` in HF. LoRA on ``n`` of them is exactly one LoRA on
      ``c_attn`` of rank ``n*r``: stack the A's, ``A = [A_1; ...; A_n]`` (``[n*r, in]``), and put
      each ``B_j`` in its own block, rows of its q/k/v slot and columns ``j*r:(j+1)*r``, zeros
      elsewhere (``[3d, n*r]``). Then ``B A`` has ``B_j A_j`` in slot j's rows and zeros in the
      others. torchtune scales by ``alpha/r``, PEFT by ``alpha'/r'``; with ``r' = n*r`` set
      ``alpha' = n*alpha`` so the scaling is unchanged. When ``n > 1`` this is written as
      ``rank_pattern``/``alpha_pattern`` for ``attn.c_attn``. (In training, PEFT would draw one
      dropout mask for the fused input where torchtune draws one per projection; the inference
      function is identical.)

    Accepts a full LoRA-model state dict: only ``*.lora_a.weight``/``*.lora_b.weight`` are read.
    Raises ValueError for LoRA keys it cannot place (e.g. on the tied output head) or missing ones.
    """
    ab = {k: v for k, v in lora_state_dict.items() if ".lora_a." in k or ".lora_b." in k}
    used = set()

    def take(key: str) -> torch.Tensor:
        if key not in ab:
            raise ValueError(f"LoRA weight {key!r} is missing; the LoRA settings {lora} expect it")
        used.add(key)
        return ab[key]

    rank, prefix = lora.lora_rank, "base_model.model.transformer.h"
    attn = [m for m in _QKV if m in lora.lora_attn_modules]
    singles = {}
    if "output_proj" in lora.lora_attn_modules:
        singles["attn.output_proj"] = "attn.c_proj"
    if lora.apply_lora_to_mlp:
        singles.update({"mlp.w1": "mlp.c_fc", "mlp.w2": "mlp.c_proj"})

    out = {}
    for i in range(config["n_layer"]):
        if attn:
            a = [take(f"layers.{i}.attn.{m}.lora_a.weight") for m in attn]
            b = [take(f"layers.{i}.attn.{m}.lora_b.weight") for m in attn]
            if any(t.shape[0] != rank for t in a):
                raise ValueError(f"layer {i}: lora_a rows {[t.shape[0] for t in a]} != lora_rank {rank}")
            dim = b[0].shape[0]
            fused_b = b[0].new_zeros(3 * dim, len(attn) * rank)
            for j, (m, b_j) in enumerate(zip(attn, b)):
                slot = _QKV.index(m)
                fused_b[slot * dim:(slot + 1) * dim, j * rank:(j + 1) * rank] = b_j
            out[f"{prefix}.{i}.attn.c_attn.lora_A.weight"] = torch.cat(a, dim=0)
            out[f"{prefix}.{i}.attn.c_attn.lora_B.weight"] = fused_b
        for tune_name, hf_name in singles.items():
            out[f"{prefix}.{i}.{hf_name}.lora_A.weight"] = take(f"layers.{i}.{tune_name}.lora_a.weight")
            out[f"{prefix}.{i}.{hf_name}.lora_B.weight"] = take(f"layers.{i}.{tune_name}.lora_b.weight")
    left = sorted(set(ab) - used)
    if left:
        raise ValueError(f"LoRA weights {left} have no GPT-2 PEFT equivalent under settings {lora}")

    target_modules = (["attn.c_attn"] if attn else []) + list(singles.values())
    extra: Dict[str, Any] = {"fan_in_fan_out": True}
    if len(attn) > 1:
        extra["rank_pattern"] = {"attn.c_attn": len(attn) * rank}
        extra["alpha_pattern"] = {"attn.c_attn": len(attn) * lora.lora_alpha}
    return {k: v.contiguous() for k, v in out.items()}, target_modules, extra
