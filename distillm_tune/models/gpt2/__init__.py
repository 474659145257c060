"""GPT-2 family (gpt2 / medium / large / xl) on torchtune components; registers ``model_type`` "gpt2"."""

from distillm_tune.models._registry import ModelFamily, register
from distillm_tune.models.gpt2._component_builders import gpt2, lora_gpt2
from distillm_tune.models.gpt2._convert_weights import hf_to_tune, lora_to_peft, tune_to_hf
from distillm_tune.models.gpt2._model_builders import gpt2_from_hf_config
from distillm_tune.models.gpt2._tokenizer import GPT2Tokenizer, gpt2_tokenizer

FAMILY = register(
    ModelFamily(
        name="gpt2",
        model_types=("gpt2",),
        build=gpt2_from_hf_config,
        hf_to_tune=hf_to_tune,
        tune_to_hf=tune_to_hf,
        load_tokenizer=gpt2_tokenizer,
        lora_to_peft=lora_to_peft,
    )
)

__all__ = [
    "FAMILY", "GPT2Tokenizer", "gpt2", "gpt2_from_hf_config", "gpt2_tokenizer", "hf_to_tune", "lora_gpt2",
    "lora_to_peft", "tune_to_hf",
]
