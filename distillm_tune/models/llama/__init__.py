"""OpenLLaMA v2 (plain Llama) on torchtune components; registers ``model_type`` "llama"."""

from distillm_tune.models._registry import ModelFamily, register
from distillm_tune.models.llama._convert_weights import hf_to_tune, lora_to_peft, tune_to_hf
from distillm_tune.models.llama._model_builders import (
    build_llama,
    llama_args_from_hf,
    lora_open_llama_3b_v2,
    lora_open_llama_7b_v2,
    open_llama_3b_v2,
    open_llama_7b_v2,
)
from distillm_tune.models.llama._tokenizer import OpenLlamaTokenizer, load_tokenizer

LLAMA = register(
    ModelFamily(
        name="llama",
        model_types=("llama",),
        build=build_llama,
        hf_to_tune=hf_to_tune,
        tune_to_hf=tune_to_hf,
        load_tokenizer=load_tokenizer,
        lora_to_peft=lora_to_peft,
    )
)

__all__ = [
    "LLAMA",
    "OpenLlamaTokenizer",
    "build_llama",
    "hf_to_tune",
    "llama_args_from_hf",
    "load_tokenizer",
    "lora_open_llama_3b_v2",
    "lora_open_llama_7b_v2",
    "lora_to_peft",
    "open_llama_3b_v2",
    "open_llama_7b_v2",
    "tune_to_hf",
]
