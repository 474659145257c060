"""T5 v1.1 and mT5 (encoder-decoder) on torchtune components; registers the "t5" family.

Not built on ``torchtune.models.t5`` (an encoder-only text encoder with exact GELU, fixed
positions and no padding mask); see ``_model.py`` for what is reused from torchtune and why.
"""

from distillm_tune.models._registry import ModelFamily, register
from distillm_tune.models.t5._component_builders import lora_t5, t5
from distillm_tune.models.t5._convert_weights import hf_to_tune, key_map, lora_to_peft, tune_to_hf
from distillm_tune.models.t5._model import (
    T5Attention,
    T5DecoderLayer,
    T5EncoderDecoder,
    generate_seq2seq,
)
from distillm_tune.models.t5._model_builders import build, real_vocab_size, t5_kwargs_from_hf_config
from distillm_tune.models.t5._tokenizer import T5Tokenizer, load_t5_tokenizer

FAMILY = register(
    ModelFamily(
        name="t5",
        model_types=("t5", "mt5"),
        is_encoder_decoder=True,
        build=build,
        hf_to_tune=hf_to_tune,
        tune_to_hf=tune_to_hf,
        load_tokenizer=load_t5_tokenizer,
        real_vocab_size=real_vocab_size,
        lora_to_peft=lora_to_peft,
    )
)

__all__ = [
    "FAMILY", "T5Attention", "T5DecoderLayer", "T5EncoderDecoder", "T5Tokenizer", "build",
    "generate_seq2seq", "hf_to_tune", "key_map", "load_t5_tokenizer", "lora_t5", "lora_to_peft",
    "real_vocab_size", "t5", "t5_kwargs_from_hf_config", "tune_to_hf",
]
