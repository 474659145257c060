"""Ports of the paper's model families onto torchtune components.

Importing this package registers every family with ``_registry``; ``hf.py`` then loads and saves
Hugging Face checkpoints of any registered ``model_type``.
"""

from distillm_tune.models import gpt2, native, opt, t5  # noqa: F401  (registration side effect)
from distillm_tune.models._registry import LoRASettings, ModelFamily, family_for, register
from distillm_tune.models.hf import (
    HFCheckpointer,
    build_hf_model,
    load_hf,
    load_hf_tokenizer,
    read_hf_config,
    read_hf_state_dict,
    save_hf,
    save_peft_adapter,
)

__all__ = [
    "HFCheckpointer",
    "LoRASettings",
    "ModelFamily",
    "build_hf_model",
    "family_for",
    "load_hf",
    "load_hf_tokenizer",
    "read_hf_config",
    "read_hf_state_dict",
    "register",
    "save_hf",
    "save_peft_adapter",
]
