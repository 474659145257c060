"""OPT family (125m / 350m / 1.3b / 2.7b) on torchtune components; registers ``model_type`` "opt"."""

from distillm_tune.models._registry import ModelFamily, register
from distillm_tune.models.opt._component_builders import lora_opt, opt
from distillm_tune.models.opt._convert_weights import hf_to_tune, lora_to_peft, tune_to_hf
from distillm_tune.models.opt._model_builders import opt_from_hf_config, opt_real_vocab_size
from distillm_tune.models.opt._tokenizer import OPTTokenizer, opt_tokenizer

FAMILY = register(
    ModelFamily(
        name="opt",
        model_types=("opt",),
        build=opt_from_hf_config,
        hf_to_tune=hf_to_tune,
        tune_to_hf=tune_to_hf,
        load_tokenizer=opt_tokenizer,
        lora_to_peft=lora_to_peft,
        real_vocab_size=opt_real_vocab_size,
    )
)

__all__ = [
    "FAMILY", "OPTTokenizer", "hf_to_tune", "lora_opt", "lora_to_peft", "opt", "opt_from_hf_config",
    "opt_real_vocab_size", "opt_tokenizer", "tune_to_hf",
]
