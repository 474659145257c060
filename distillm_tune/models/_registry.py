"""The contract between the HF checkpointer (``hf.py``) and the model families.

Each family (gpt2/, opt/, llama/, t5/) registers one :class:`ModelFamily`; ``hf.py`` reads an HF
``config.json``, finds the family by ``model_type`` and uses the callables below to build the
torchtune-component model, convert weights in both directions and load the tokenizer. Keeping
this the only link means a new family is one folder plus one ``register(...)`` call.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import torch
from torch import nn

StateDict = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoRASettings:
    """What to adapt and how, in torchtune's vocabulary (see ``torchtune.models.llama2.lora_llama2``).

    ``lora_attn_modules`` uses torchtune names: "q_proj", "k_proj", "v_proj", "output_proj".
    """

    lora_attn_modules: tuple = ("q_proj", "v_proj")
    apply_lora_to_mlp: bool = False
    apply_lora_to_output: bool = False
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0


@dataclass(frozen=True)
class ModelFamily:
    name: str
    # HF ``config.json`` ``model_type`` values this family handles (e.g. ("gpt2",), ("t5", "mt5")).
    model_types: tuple
    # build(hf_config: dict, lora: Optional[LoRASettings]) -> nn.Module, weights uninitialised
    # (safe to call under ``torch.device("meta")``).
    build: Callable[[Dict[str, Any], Optional[LoRASettings]], nn.Module]
    # hf_to_tune(hf_state_dict, hf_config) -> torchtune-module state dict (base weights only).
    # Accepts every key form the family's checkpoints come in (hub prefixes, transformers-5
    # save_pretrained prefixes); drops non-parameter buffers; raises ValueError naming a bad key.
    hf_to_tune: Callable[[StateDict, Dict[str, Any]], StateDict]
    # tune_to_hf(tune_state_dict, hf_config) -> state dict that transformers' model of this type
    # loads with ``from_pretrained`` (LoRA already merged; no lora_* keys).
    tune_to_hf: Callable[[StateDict, Dict[str, Any]], StateDict]
    # load_tokenizer(checkpoint_dir, max_seq_len) -> tokenizer with encode/decode/bos_id/eos_id/pad_id
    # whose ids equal the HF tokenizer's (None if not provided yet).
    load_tokenizer: Optional[Callable[..., Any]] = None
    # lora_to_peft(lora_state_dict, hf_config, lora) -> (peft_state_dict, target_modules):
    # converts the ``*.lora_a.weight`` / ``*.lora_b.weight`` entries of a torchtune LoRA model
    # into PEFT's ``base_model.model.<hf module>.lora_A.weight`` form, plus the HF module names
    # for ``adapter_config.json``'s ``target_modules``. Loading the result with
    # ``peft.PeftModel.from_pretrained`` on the exported base model must give the LoRA model's
    # logits. None: PEFT export not supported for this family (say so in the error).
    lora_to_peft: Optional[Callable[[StateDict, Dict[str, Any], LoRASettings], tuple]] = None
    is_encoder_decoder: bool = False
    # Number of token ids the tokenizer really uses (embedding rows beyond it are padding):
    # real_vocab_size(hf_config) -> int, or None to use config["vocab_size"].
    real_vocab_size: Optional[Callable[[Dict[str, Any]], int]] = None


_FAMILIES: Dict[str, ModelFamily] = {}


def register(family: ModelFamily) -> ModelFamily:
    for model_type in family.model_types:
        if model_type in _FAMILIES and _FAMILIES[model_type].name != family.name:
            raise ValueError(f"model_type {model_type!r} is registered twice")
        _FAMILIES[model_type] = family
    return family


def family_for(model_type: str) -> ModelFamily:
    # Importing the package registers every family.
    import distillm_tune.models  # noqa: F401

    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; expected one of {sorted(_FAMILIES)}"
        ) from None
