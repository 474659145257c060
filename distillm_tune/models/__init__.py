"""Ports of the paper's model families onto torchtune components.

Importing this package registers every family with ``_registry``; ``hf.py`` then loads and saves
Hugging Face checkpoints of any registered ``model_type``.
"""

from distillm_tune.models import gpt2, llama, opt, t5  # noqa: F401  (registration side effect)
from distillm_tune.models._registry import LoRASettings, ModelFamily, family_for, register

__all__ = ["LoRASettings", "ModelFamily", "family_for", "register"]
