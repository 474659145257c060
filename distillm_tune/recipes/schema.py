"""The keys of the shipped recipes, their types, defaults and allowed ranges: the one place they
live. ``training.settings.read_schema`` turns a dataclass here into the recipe's checks (unknown
keys with a did-you-mean, types and ranges before any model loads) and the defaults of absent
keys; ``distillm-tune validate`` runs the same checks on a config file.
"""

from dataclasses import dataclass
from typing import Any, List, Optional

from distillm_tune.sgo.policy import METHODS
from distillm_tune.sgo.scheduler import REPLAY_RATIOS
from distillm_tune.training.quantization import SCHEMES as QUANTIZATION_SCHEMES
from distillm_tune.training.settings import Component, setting

DTYPES = ("fp32", "bf16")
# distillm2 presets (DISTILLM2_SPEC §5.1): what the released code runs, and the paper's full method
DISTILLM2_PRESETS = {
    "code_faithful": {"curriculum_alpha": False, "gradual_beta": False},
    "paper_full": {"curriculum_alpha": True, "gradual_beta": True},
}
MIXED_PRECISIONS = ("bf16",)


@dataclass(kw_only=True)
class LoRAConfig:
    lora_attn_modules: List[str] = setting(["q_proj", "v_proj"], doc="torchtune names: q_proj, k_proj, v_proj, output_proj")
    apply_lora_to_mlp: bool = setting(False)
    apply_lora_to_output: bool = setting(False)
    lora_rank: int = setting(8, low=1)
    lora_alpha: float = setting(16.0, low=0, low_open=True)
    lora_dropout: float = setting(0.0, low=0, high=1)


@dataclass(kw_only=True)
class StudentConfig:
    checkpoint_dir: str = setting(doc="a Hugging Face checkpoint directory")
    lora: Optional[LoRAConfig] = setting(None, doc="null: full fine-tuning")


@dataclass(kw_only=True)
class TeacherConfig:
    checkpoint_dir: Optional[str] = setting(None, doc="required by every method but sft and seqkd")
    quantization: Optional[str] = setting(None, choices=QUANTIZATION_SCHEMES,
                                          doc="torchao weight-only quantization of the frozen teacher's layers")


@dataclass(kw_only=True)
class LMConfig:
    dataset: Optional[Component] = setting(None, doc="pretraining text for the LM term; null: no LM term")
    coef: float = setting(1.0, low=0)
    batch_size: Optional[int] = setting(None, low=1, doc="null: batch_size")


@dataclass(kw_only=True)
class ValidationConfig:
    dataset: Component = setting(doc="the validation split; drives the SGO scheduler and the divergence guard")
    every_n_steps: Optional[int] = setting(None, low=1, doc="null: at the end of every epoch")
    batch_size: Optional[int] = setting(None, low=1, doc="null: batch_size")
    max_examples: Optional[int] = setting(None, low=1, doc="null: the whole split")
    rouge_examples: int = setting(0, low=0, doc="> 0: greedy ROUGE-L on that many rows; best exported to hf_model_best")


@dataclass(kw_only=True)
class SGOSchedulerConfig:
    _component_: str = setting("distillm_tune.sgo.AdaptiveSGOScheduler")
    phi0: float = setting(0.0, low=0, high=1, doc="initial probability of student-generated outputs (paper App. C)")
    num_stages: int = setting(10, low=1)
    tolerance: float = setting(0.1, low=0)
    replay_ratio: str = setting("decreasing", choices=REPLAY_RATIOS)


@dataclass(kw_only=True)
class ReplayBufferConfig:
    _component_: str = setting("distillm_tune.sgo.ReplayBuffer")
    capacity: int = setting(1000, low=1, doc="paper App. E.8")


@dataclass(kw_only=True)
class SGOConfig:
    max_new_tokens: Optional[int] = setting(None, low=1, doc="null: max_seq_len - max_prompt_len (the paper)")
    temperature: float = setting(1.0, low=0)
    top_p: float = setting(1.0, low=0, high=1, low_open=True)
    top_k: Optional[int] = setting(None, low=1)
    pack_weights: bool = setting(True, doc="CPU fp32: multiply with MKL-packed copies of the student's linear weights "
                                 "during generation (faster; + the weights' size in memory for the call)")
    gkd_sgo_prob: float = setting(0.5, low=0, high=1, doc="method=gkd: share of on-policy steps")
    start_after_steps: int = setting(0, low=0, doc="no student-generated outputs before this many optimizer steps")
    scheduler: SGOSchedulerConfig = setting(SGOSchedulerConfig())
    replay_buffer: ReplayBufferConfig = setting(ReplayBufferConfig())


@dataclass(kw_only=True)
class GuardsConfig:
    on_nonfinite: str = setting("skip", choices=("skip", "stop"))
    max_nonfinite_steps: int = setting(3, low=1)
    on_divergence: str = setting("stop", choices=("stop", "warn"))
    max_val_loss_ratio: float = setting(5.0, low=1, low_open=True)
    max_dropped_fraction: float = setting(0.5, low=0, high=1)
    max_duplicate_fraction: float = setting(0.2, low=0, high=1)
    degenerate_sgo: str = setting("skip", choices=("skip", "keep"), doc="empty/EOS-only/repetitive student outputs")
    max_repeated_ngram_fraction: float = setting(0.5, low=0, high=1)


@dataclass(kw_only=True)
class DistiLLM2Config:
    teacher_responses: Optional[str] = setting(None, doc="null: generated once at the start into output_dir")
    preset: str = setting("code_faithful", choices=tuple(DISTILLM2_PRESETS))
    curriculum_alpha: Optional[bool] = setting(None, doc="null: the preset's")
    gradual_beta: Optional[bool] = setting(None, doc="null: the preset's")
    alpha_min: float = setting(0.01, low=0, high=1)


@dataclass(kw_only=True)
class ProfilerConfig:
    _component_: str = setting("torchtune.training.setup_torch_profiler")
    enabled: bool = setting(False)
    output_dir: str = setting("${output_dir}/profiling_outputs")


@dataclass(kw_only=True)
class KDOffPolicyConfig:
    """Recipe ``kd_offpolicy``; the shipped ``tiny_cpu.yaml`` documents each key."""

    output_dir: str = setting()
    method: str = setting("distillm", choices=METHODS)
    loss: Component = setting({}, doc="empty: the method's divergence; keys override its arguments")
    kd_ratio: float = setting(1.0, low=0, high=1)
    lm: LMConfig = setting(LMConfig())
    seqkd_data: Optional[str] = setting(None, doc="method=seqkd: jsonl of teacher responses")
    student: StudentConfig = setting()
    teacher: TeacherConfig = setting(TeacherConfig())
    max_seq_len: int = setting(low=2)
    max_prompt_len: int = setting(low=1)
    dataset: Component = setting()
    validation: ValidationConfig = setting()
    sgo: SGOConfig = setting(SGOConfig())
    guards: GuardsConfig = setting(GuardsConfig())
    distillm2: Optional[DistiLLM2Config] = setting(None, doc="method=distillm2 settings")
    seed: int = setting(1, low=0)
    epochs: int = setting(low=1)
    max_steps_per_epoch: Optional[int] = setting(None, low=1)
    batch_size: int = setting(low=1)
    gradient_accumulation_steps: int = setting(1, low=1)
    num_output_chunks: int = setting(8, low=0, doc="0: one dense logits tensor")
    fused_loss_chunk_size: Optional[int] = setting(None, low=1)
    clip_grad_norm: Optional[float] = setting(1.0, low=0, low_open=True)
    optimizer: Component = setting()
    lr_scheduler: Component = setting()
    device: str = setting("cpu")
    dtype: str = setting("fp32", choices=DTYPES)
    mixed_precision: Optional[str] = setting(
        None, choices=MIXED_PRECISIONS,
        doc="bf16: fp32 master weights and optimizer state, bf16 compute (FSDP2 MixedPrecisionPolicy with fp32 "
            "gradient reduction on 2+ processes, torch.autocast on one), losses in fp32; needs dtype=fp32")
    enable_activation_checkpointing: bool = setting(False)
    compile: bool = setting(False, doc="torch.compile the models' layers and the loss")
    profiler: ProfilerConfig = setting(ProfilerConfig())
    log_peak_memory_stats: bool = setting(False)
    save_every_n_steps: Optional[int] = setting(None, low=1)
    keep_last_checkpoints: int = setting(2, low=1)
    resume_from_checkpoint: bool = setting(False)
    overwrite: bool = setting(False)
    log_every_n_steps: int = setting(1, low=1)
    metric_logger: Component = setting({"_component_": "distillm_tune.training.JsonlMetricLogger",
                                        "log_dir": "${output_dir}"})
    # path variables the shipped configs interpolate (${assets_dir}/student)
    assets_dir: Optional[str] = setting(None)
    checkpoints_dir: Optional[str] = setting(None)
    data_dir: Optional[str] = setting(None)


@dataclass(kw_only=True)
class EvaluateConfig:
    """Recipe ``evaluate``; keys documented in ``distillm_tune/recipes/evaluate.py``."""

    model_dir: str = setting()
    tokenizer_dir: Optional[str] = setting(None)
    output_dir: str = setting()
    datasets: List[Any] = setting()
    on_bad_row: str = setting("error", choices=("error", "skip"))
    decoding: str = setting("sampling", choices=("sampling", "greedy"))
    template: str = setting("paper", choices=("paper", "chat"))
    seeds: List[int] = setting([10, 20, 30, 40, 50])
    temperature: float = setting(1.0, low=0)
    top_p: float = setting(1.0, low=0, high=1, low_open=True)
    max_seq_len: int = setting(512, low=2)
    max_prompt_len: int = setting(256, low=1)
    greedy_max_new_tokens: int = setting(128, low=1)
    max_source_len: int = setting(512, low=2)
    batch_size: int = setting(16, low=1)
    max_examples: Optional[int] = setting(None, low=1)
    dtype: str = setting("fp32", choices=DTYPES)
    device: str = setting("cpu")
    assets_dir: Optional[str] = setting(None)
    checkpoints_dir: Optional[str] = setting(None)
    data_dir: Optional[str] = setting(None)
