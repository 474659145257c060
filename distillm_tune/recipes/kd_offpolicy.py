"""Knowledge distillation with adaptive off-policy student-generated outputs (DistiLLM).

    tune run distillm_tune/recipes/kd_offpolicy --config configs/tiny_cpu.yaml \\
        assets_dir=DIR output_dir=OUT method=distillm
    tune run --nproc_per_node 2 distillm_tune/recipes/kd_offpolicy --config ...

One recipe for the paper's method and its baselines: ``method`` picks the data policy
(``sft``, ``kd``, ``seqkd``, ``imitkd``, ``gkd``, ``distillm``) and, unless ``loss._component_``
is set, the divergence (see ``METHOD_LOSSES``); any divergence works with any policy.
``method=distillm2`` (DistiLLM-2, DISTILLM2_SPEC) trains on pairs instead: each batch holds B
teacher responses and the student's own responses to the same B prompts, sampled from the current
student at the start of every epoch, with ``DistiLLM2Loss`` (see ``_distillm2_sums``).

One optimizer step, as it reads below in ``_train_step``:
  for each micro-batch: draw u (the same on every rank) -> choose dataset / fresh SGO / replay
  -> (generate with the student and push into the replay buffer) -> collate;
  count the step's tokens over all micro-batches and ranks;
  for each micro-batch: teacher forward (no grad) + student forward -> divergence sum, CE sum
  -> backward of the step-normalised loss;
  clip, optimizer step, LR step; at a validation point the scheduler's φ follows the
  validation loss.
"""

import contextlib
import hashlib
import itertools
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torchtune import config, training, utils
from torchtune.modules.peft import get_adapter_params, set_trainable_params
from tqdm import tqdm

from distillm_tune.data.collate import CROSS_ENTROPY_IGNORE_IDX
from distillm_tune.data.pretrain import collate_packed
from distillm_tune.losses import DistiLLM2Loss, Divergence, FusedLinearDivergence
from distillm_tune.losses.contrastive import adaptive_alpha, gradual_beta_b, sequence_mean_logprob
from distillm_tune.losses.torchtune_compat import adapt_loss_config
from distillm_tune.losses.cross_entropy import cross_entropy_sum_and_count
from distillm_tune.models import LoRASettings, family_for, load_hf, load_hf_tokenizer, read_hf_config
from distillm_tune.models.tokenizer import cut_at_stop, stop_ids
from distillm_tune.models.hf import save_hf_state_dict, save_peft_adapter_state_dict
from distillm_tune.sgo import SGO_METHODS, SOURCES, choose_source, degenerate_reason, shared_uniform
from distillm_tune.training import RecipeCheckpointer, all_reduce_sum, init_process_group_for
from distillm_tune.training.checkpointing import CheckpointWriteError, free_space
from distillm_tune.training.distributed import exit_with_launcher, run_on_rank_zero, shard_layers
from distillm_tune.training.model_io import LAYER_CLASSES, model_io_for, output_projection
from distillm_tune.training.output_dir import OutputDirClaim, check_output_dir
from distillm_tune.training.quantization import model_bytes, quantize_frozen
from distillm_tune.training.resume import apply_optimizer_changes, config_changes
from distillm_tune.training.settings import check_schema, read_schema
from distillm_tune.recipes.schema import DISTILLM2_PRESETS, DistiLLM2Config, KDOffPolicyConfig

log = utils.get_logger("INFO")

# method -> default divergence (component, kwargs); None: cross-entropy only, no teacher at train time
METHOD_LOSSES = {
    "sft": None,
    "seqkd": None,
    "kd": ("distillm_tune.losses.ForwardKLLoss", {}),
    "imitkd": ("distillm_tune.losses.ForwardKLLoss", {}),
    # Eq. 4 convention; the paper's GKD numbers come from m = 0.1 p + 0.9 q, i.e. beta = 0.1
    "gkd": ("distillm_tune.losses.JSDLoss", {"beta": 0.1}),
    "distillm": ("distillm_tune.losses.SkewReverseKLLoss", {"alpha": 0.1}),
    # SKL(alpha) on teacher responses + SRKL(alpha) with stop-gradient on the student's; alpha = alpha0
    "distillm2": ("distillm_tune.losses.DistiLLM2Loss", {"alpha": 0.1}),
}

DISTILLM2_TEACHER_FILE = "distillm2_teacher_responses.jsonl"


# torchtune recipe keys this recipe does not implement: accepted only when off.
TORCHTUNE_KEYS_OFF = ("optimizer_in_bwd", "clip_grad_norm_type")
SCHEMA = read_schema(KDOffPolicyConfig)  # every key, its type, range and default (recipes/schema.py)


def peak_memory_stats(device: torch.device) -> Dict[str, float]:
    """``log_peak_memory_stats``: torchtune's CUDA peaks; on CPU the process's peak resident
    memory (torchtune supports no CPU figure)."""
    if device.type == "cpu":
        import resource

        return {"peak_memory_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}  # KiB -> GiB
    return training.get_memory_stats(device, reset_stats=False)


def deal_replay_samples(buffers: List[List[Any]], world_size: int, rank: int, capacity: int) -> List[Any]:
    """Rank ``rank``'s replay buffer (oldest first) when the per-rank ``buffers`` saved by another
    number of ranks are shared among ``world_size``: the samples interleaved by age (every saved
    rank's oldest, then the next ...), dealt round robin, every rank keeping the same number (the
    data policy compares buffer lengths, equal on every rank), the newest ``capacity`` of them."""
    merged = [s for age in itertools.zip_longest(*buffers) for s in age if s is not None]
    per_rank = len(merged) // world_size
    return merged[rank::world_size][:per_rank][-capacity:] if per_rank else []


class RunStopped(RuntimeError):
    """The run stopped itself rather than train on, or export, garbage (``guards.*``)."""


def _setting_error(setting: str, message: str) -> ValueError:
    return ValueError(f"config {setting}: {message}")


def check_config(cfg: DictConfig) -> DictConfig:
    """Every check that needs no file, model or process (also ``distillm-tune validate``): unknown
    keys, types, ranges, component arguments, then rules across keys. Returns ``cfg`` with every
    absent key set to its schema default."""
    cfg = check_schema(cfg, SCHEMA, TORCHTUNE_KEYS_OFF)
    if cfg.mixed_precision is not None and cfg.dtype != "fp32":
        raise _setting_error(
            "mixed_precision",
            f"mixed_precision={cfg.mixed_precision} keeps fp32 master weights and computes in {cfg.mixed_precision}; "
            f"it needs dtype=fp32, got dtype={cfg.dtype} (dtype=bf16 alone: bf16 weights and optimizer state, "
            "no fp32 copy). Set dtype=fp32 or mixed_precision=null",
        )
    if cfg.max_prompt_len >= cfg.max_seq_len:
        raise _setting_error("max_prompt_len", f"must be below max_seq_len={cfg.max_seq_len}, got {cfg.max_prompt_len}")
    if METHOD_LOSSES[cfg.method] is not None and cfg.teacher.checkpoint_dir is None:
        raise _setting_error("teacher.checkpoint_dir", f"required by method={cfg.method} (a teacher checkpoint directory)")
    if cfg.method == "distillm2":
        if cfg.kd_ratio != 1.0:
            raise _setting_error("kd_ratio", f"method=distillm2 has no cross-entropy term; expected 1.0, got {cfg.kd_ratio}")
        if cfg.fused_loss_chunk_size is not None:
            raise _setting_error("fused_loss_chunk_size", "method=distillm2 needs the logits (per-sequence means and "
                                                          "probability gaps); set it to null")
    if cfg.loss and "_component_" in cfg.loss:  # a torchtune loss is adapted, or refused with the reason
        adapt_loss_config(OmegaConf.to_container(cfg.loss, resolve=True))
    _check_components(cfg)
    return cfg


def loss_config(cfg: DictConfig) -> Tuple[Optional[Dict[str, Any]], Optional[str]]:
    """The divergence's component config: the method's default with ``loss.*`` over it, torchtune's
    KD losses adapted to ours (and the note saying so); None for a method without a teacher."""
    preset = METHOD_LOSSES[cfg.method]
    if preset is None:
        return None, None
    loss_cfg = OmegaConf.to_container(cfg.loss or OmegaConf.create({}), resolve=True)
    if "_component_" not in loss_cfg:
        loss_cfg = {"_component_": preset[0], **preset[1], **loss_cfg}
    return adapt_loss_config(loss_cfg)


def build_divergence(cfg: DictConfig, loss_cfg: Dict[str, Any], alpha_min: Optional[float] = None):
    """The divergence of ``loss_cfg``, checked against the method: refusals name the key."""
    try:
        loss_fn = config.instantiate(OmegaConf.create(loss_cfg))
    except (ValueError, TypeError) as e:
        raise _setting_error("loss", f"{loss_cfg}: {e}") from e
    if cfg.method == "distillm2":
        if not isinstance(loss_fn, DistiLLM2Loss):
            raise _setting_error("loss._component_", f"method=distillm2 trains with distillm_tune.losses.DistiLLM2Loss "
                                                     f"(SKL on teacher, SRKL on student responses), got {loss_cfg['_component_']}")
        if alpha_min is not None and alpha_min > loss_fn.alpha:
            raise _setting_error("distillm2.alpha_min", f"must not exceed alpha0 = loss.alpha = {loss_fn.alpha}, "
                                                        f"got {alpha_min}")
    elif not isinstance(loss_fn, Divergence):
        raise _setting_error("loss._component_", f"{loss_cfg['_component_']} built a {type(loss_fn).__name__}, "
                             "not a distillm_tune.losses.Divergence")
    return loss_fn


# torch.optim's messages for a bad value -> the argument (e.g. "Invalid learning rate: -1")
_OPTIMIZER_MESSAGES = {"learning rate": "lr", "epsilon": "eps", "beta": "betas", "weight_decay": "weight_decay",
                       "momentum": "momentum"}


def _check_components(cfg: DictConfig) -> None:
    """The values the components themselves refuse, found by building them on nothing: the
    divergence, the optimizer over one dummy parameter and its learning-rate schedule (so the
    recipe and ``distillm-tune validate`` refuse them before any model loads, naming the key)."""
    loss_cfg, _ = loss_config(cfg)
    if loss_cfg is not None:
        d2 = cfg.distillm2 or OmegaConf.structured(DistiLLM2Config())
        build_divergence(cfg, loss_cfg, float(d2.alpha_min) if cfg.method == "distillm2" else None)
    # ValueError is a refused value; anything else (an optimizer that needs a GPU parameter, say)
    # is left to the real build
    try:
        optimizer = config.instantiate(cfg.optimizer, [nn.Parameter(torch.zeros(1))])
    except ValueError as e:
        key = next((k for text, k in _OPTIMIZER_MESSAGES.items() if text in str(e).lower()), None)
        raise _setting_error(f"optimizer.{key}" if key else "optimizer", str(e)) from None
    except Exception:  # noqa: BLE001
        return
    try:
        # the run's step count is known only once the data is read: any count the schedule takes
        config.instantiate(cfg.lr_scheduler, optimizer, num_training_steps=2**31)
    except ValueError as e:
        raise _setting_error("lr_scheduler", str(e)) from None
    except Exception:  # noqa: BLE001
        pass


class KDOffPolicyRecipe:
    """Distil a student from a teacher with one of the paper's data policies.

    The config keys are documented in ``configs/tiny_cpu.yaml``.
    """

    def __init__(self, cfg: DictConfig) -> None:
        cfg = check_config(cfg)
        self.cfg = cfg
        self.method = cfg.method
        exit_with_launcher()
        self.device = utils.get_device(cfg.device)
        self.dtype = training.get_dtype(cfg.dtype, device=self.device)
        self.world_size, self.rank = init_process_group_for(self.device)
        self.is_rank_zero = self.rank == 0
        self.distributed = self.world_size > 1
        # mixed_precision=bf16: the student's weights (and so its gradients and optimizer state)
        # stay fp32, the forwards compute in bf16: FSDP2 casts the gathered parameters (2+
        # processes), torch.autocast does it on one. The frozen teacher is held in bf16: it has no
        # update to lose, and its matmuls would run in bf16 under either mechanism anyway.
        self.mixed_precision = None if cfg.mixed_precision is None else training.get_dtype(cfg.mixed_precision,
                                                                                             device=self.device)
        self.compute_dtype = self.mixed_precision or self.dtype  # also the KV cache's dtype
        self.teacher_dtype = self.compute_dtype
        self.seed = training.set_seed(seed=cfg.seed)
        self.output_dir = cfg.output_dir
        self.uses_teacher = METHOD_LOSSES[self.method] is not None
        self.batch_size = int(cfg.batch_size)
        self.grad_accum = int(cfg.gradient_accumulation_steps)
        self.kd_ratio = float(cfg.kd_ratio) if self.uses_teacher else 0.0
        self.clip_grad_norm = cfg.clip_grad_norm
        sgo = cfg.sgo
        self.sgo_cfg = {"temperature": float(sgo.temperature), "top_p": float(sgo.top_p), "top_k": sgo.top_k,
                        "pack_weights": bool(sgo.pack_weights)}
        self.max_new_tokens = int(sgo.max_new_tokens or cfg.max_seq_len - cfg.max_prompt_len)
        self.gkd_sgo_prob = float(sgo.gkd_sgo_prob)
        self.guards = cfg.guards
        self._nonfinite_run = 0  # consecutive skipped steps
        self.first_val_loss: Optional[float] = None
        self.diverged = False  # with guards.on_divergence=warn
        # SGO only after this many optimizer steps (a student that is not yet sensible would
        # train on its own gibberish); distillm2 counts it at epoch starts (_ensure_student_responses)
        self.sgo_start = int(cfg.sgo.start_after_steps)
        self.d2 = self._distillm2_settings(cfg) if self.method == "distillm2" else None

    def _distillm2_settings(self, cfg: DictConfig) -> Dict[str, Any]:
        """``distillm2.*``: a preset, each curriculum switchable on its own (null: the preset's)."""
        d2 = cfg.distillm2 or OmegaConf.structured(DistiLLM2Config())  # distillm2: null -> the defaults
        out = dict(DISTILLM2_PRESETS[d2.preset], preset=d2.preset)
        for key in ("curriculum_alpha", "gradual_beta"):
            if d2.get(key, None) is not None:
                out[key] = bool(d2[key])
        out["alpha_min"] = float(d2.alpha_min)
        out["teacher_responses"] = d2.teacher_responses
        return out

    # ------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        """Load and check everything; a failure leaves ``output_dir`` as it was (OutputDirClaim)."""
        self.output_claim: Optional[OutputDirClaim] = None
        try:
            self._setup()
        except BaseException:
            self._abandon_output_dir()
            raise

    def preflight(self, dry_run: bool = False) -> None:
        """Every check that loads no model, in the order a run makes them: the checkpoint folders,
        ``output_dir`` (an earlier run there, a checkpoint to resume), the divergence, the
        tokenizers, the data. With ``dry_run`` (``distillm-tune validate``) nothing is written:
        ``output_dir`` is inspected, not claimed, and a corrupt checkpoint is not set aside."""
        cfg = self.cfg
        self.student_dir = self._existing_dir("student.checkpoint_dir", cfg.student.checkpoint_dir)
        self.teacher_dir = (self._existing_dir("teacher.checkpoint_dir", cfg.teacher.checkpoint_dir)
                            if self.uses_teacher else None)
        self.resuming = bool(cfg.resume_from_checkpoint)
        self.checkpointer = RecipeCheckpointer(self.output_dir, keep_last=int(cfg.keep_last_checkpoints),
                                               device=self.device)
        if dry_run:
            self._checked("output_dir", check_output_dir, str(self.output_dir), self.resuming, bool(cfg.overwrite))
        else:
            run_on_rank_zero(self._claim_output_dir)
        self.resume_path = self._find_resume_checkpoint(set_aside_corrupt=not dry_run) if self.resuming else None
        self.resume_settings = self._read_resume_settings(self.resume_path) if self.resume_path else None
        self.loss_fn = self._build_loss(self.student_dir, self.teacher_dir)
        self.tokenizer = self._checked("student.checkpoint_dir", load_hf_tokenizer, self.student_dir)
        student_config = read_hf_config(self.student_dir)
        self.io = model_io_for(family_for(student_config["model_type"]), self.tokenizer, student_config)
        if self.teacher_dir is not None:
            self._check_same_tokenizer(self.student_dir, self.teacher_dir)
        self.train_data, self.valid_data = self._build_data()

    def _setup(self) -> None:
        cfg = self.cfg
        self.preflight()
        student_dir, teacher_dir, resume_path = self.student_dir, self.teacher_dir, self.resume_path
        # every check that needs no model passed: an earlier run (overwrite=true) makes way now
        run_on_rank_zero(lambda: self.output_claim.set_aside())
        if self.d2 is not None:  # before the step count: only prompts with a teacher response train
            self.train_data = self._build_pairs(teacher_dir)
        self.lm_data, self.lm_coef, self.lm_batch_size = self._build_lm_data()

        self.micro_batches_per_epoch = len(self.train_data) // (self.batch_size * self.world_size)
        steps = self.micro_batches_per_epoch // self.grad_accum
        if cfg.max_steps_per_epoch is not None:
            steps = min(steps, int(cfg.max_steps_per_epoch))
        if steps < 1:
            raise _setting_error(
                "batch_size",
                f"{len(self.train_data)} training samples give no full optimizer step with batch_size="
                f"{self.batch_size} x {self.world_size} ranks x gradient_accumulation_steps={self.grad_accum}",
            )
        self.steps_per_epoch = steps
        self.total_steps = steps * int(cfg.epochs)
        resume_state = self._read_resume_state(self.resume_settings, resume_path) if resume_path else None

        lora = cfg.student.lora
        self.lora = None if lora is None else LoRASettings(
            **{k: (tuple(v) if k == "lora_attn_modules" else v) for k, v in OmegaConf.to_container(lora).items()}
        )
        torch.manual_seed(self.seed)  # identical LoRA init on every rank
        self.student = self._load_model("student.checkpoint_dir", student_dir, self.lora, trainable=True,
                                        dtype=self.dtype)
        self.teacher = self._load_model("teacher.checkpoint_dir", teacher_dir, None, trainable=False,
                                        dtype=self.teacher_dtype) if self.uses_teacher else None

        num_chunks = int(cfg.num_output_chunks)
        for model in (self.student, self.teacher):
            if model is not None:
                self.io.prepare(model, num_chunks)
        self.fused_loss = self._build_fused_loss()
        if cfg.compile and isinstance(self.loss_fn, Divergence):  # DistiLLM2Loss runs eager
            self.loss_fn.compile_kernel()

        if resume_state is not None:
            # Before the optimizer exists (DCP copies into the parameters in place; a loader that
            # replaced them would leave an optimizer built earlier stepping the old ones).
            self._load_student_state(resume_path)
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.optimizer = config.instantiate(cfg.optimizer, trainable)
        self.lr_scheduler = config.instantiate(cfg.lr_scheduler, self.optimizer, num_training_steps=self.total_steps)

        self.buffer = config.instantiate(cfg.sgo.replay_buffer)
        self.scheduler = config.instantiate(cfg.sgo.scheduler, total_steps=self.total_steps)
        # u must be equal on all ranks: one generator seeded identically everywhere (and
        # shared_uniform broadcasts rank 0's draw). Sampling and replay draws differ per rank.
        self.policy_gen = torch.Generator().manual_seed(self.seed)
        self.sample_gen = torch.Generator(device=self.device).manual_seed(self.seed + 1000 + self.rank)
        self.buffer_gen = torch.Generator().manual_seed(self.seed + 2000 + self.rank)

        self.metric_logger = config.instantiate(cfg.metric_logger) if self.is_rank_zero else None
        if resume_state is not None and hasattr(self.metric_logger, "resume_at"):
            # the steps after the checkpoint run again: a logger that can drops their earlier rows
            self.metric_logger.resume_at(resume_state["recipe_state"]["global_step"])
        # torchtune's profiler: a no-op unless profiler.enabled; traces go to profiler.output_dir
        self.profiler, _ = config.instantiate(cfg.profiler)
        if self.metric_logger is not None:
            self.metric_logger.log_config(cfg)  # every torchtune metric logger records the run's config
        self.global_step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.train_time = 0.0
        # distillm2: the student's responses of the current round (one per training sample, None
        # before SGO starts), the epoch they were sampled in, and the alpha curriculum's anchors
        self.student_responses: Optional[List[Optional[List[int]]]] = None
        self.responses_epoch = -1
        self.d2_anchors: Optional[Tuple[int, float, float]] = None  # (epoch, m_t, m_s)
        self._degenerate_warned = False
        self.best_rouge = float("-inf")
        if resume_state is not None:
            self._resume(resume_state, resume_path)
        else:
            self.checkpointer.start_run()
            if self.method == "distillm":
                # L_prev starts as the validation loss of the initial student (paper App. C)
                self.first_val_loss = self.validation_loss()
                self.scheduler.start(self.first_val_loss)
                if self.metric_logger is not None:  # the reference the scheduler compares against
                    self.metric_logger.log_dict({"val_loss_start": self.first_val_loss, "phi": self.scheduler.phi}, step=0)

    def _claim_output_dir(self) -> None:
        """Rank 0: lock ``output_dir`` and refuse an earlier run's outputs unless resuming or
        overwriting (training/output_dir.py)."""
        try:
            self.output_claim = OutputDirClaim(str(self.output_dir), self.resuming, bool(self.cfg.overwrite))
        except (ValueError, OSError) as e:
            raise _setting_error("output_dir", str(e)) from None

    def _abandon_output_dir(self) -> None:
        """Rank 0, a run that failed before its first step: ``output_dir`` back as it was."""
        if self.output_claim is not None:
            self.output_claim.abandon()

    def _existing_dir(self, setting: str, path: Optional[str]) -> str:
        """A checkpoint directory whose config.json is readable and names a known family."""
        if path is None or not os.path.isdir(str(path)):
            raise _setting_error(setting, f"checkpoint directory {path!r} does not exist")
        hf_config = self._checked(setting, read_hf_config, str(path))
        if "model_type" not in hf_config:
            raise _setting_error(setting, f"{os.path.join(str(path), 'config.json')} has no 'model_type'; "
                                          "expected an HF config.json naming the model family")
        self._checked(setting, family_for, hf_config["model_type"])
        return str(path)

    @staticmethod
    def _checked(setting: str, fn, *args, **kwargs):
        """``fn(*args)``, with a failure reported under the config key it comes from."""
        try:
            return fn(*args, **kwargs)
        except (ValueError, OSError, KeyError, NotImplementedError) as e:
            raise _setting_error(setting, str(e)) from e

    def _build_fused_loss(self) -> Optional[FusedLinearDivergence]:
        """``fused_loss_chunk_size: N``: the divergence and the CE from final hidden states and
        output weights, N tokens at a time, so neither model's ``[tokens, V]`` logits are ever
        built (~80% less loss memory, docs/benchmarks.md §1); any kd_ratio, one or N processes
        (``_loss_sums``). Checked here, identically on every rank. Still refused: methods without
        a divergence (nothing to fuse), encoder-decoders (T5's head and loss have no hidden-state
        entry point here; the logits path serves them), a head that is not a plain or tied linear
        layer (soft-capped Gemma 2, LoRA on the head); method=distillm2 is refused in
        ``check_config`` (its per-sequence means and α need the logits)."""
        chunk = self.cfg.fused_loss_chunk_size
        if chunk is None:
            return None
        key = "fused_loss_chunk_size"
        if self.loss_fn is None:
            raise _setting_error(key, f"method={self.method} has no divergence to fuse; set it to null")
        if self.io.is_encoder_decoder:
            raise _setting_error(key, "the fused loss supports decoder-only models; T5/mT5 use the logits path (null)")
        for name, model in (("student", self.student), ("teacher", self.teacher)):
            try:
                output_projection(model)
            except ValueError as e:
                raise _setting_error(key, f"{name}: {e}") from None
        if isinstance(self.teacher, FSDPModule):
            # The loss reads the teacher's head whole from inside the student's forward: its root
            # group (embeddings, norm, head) stays gathered after the teacher's forward instead of
            # being gathered a second time, and is resharded once the loss is computed.
            self.teacher.set_reshard_after_forward(False, recurse=False)
        return FusedLinearDivergence(self.loss_fn, chunk_size=int(chunk))

    def _build_loss(self, student_dir: str, teacher_dir: Optional[str]) -> Optional[Divergence]:
        # torchtune's KD losses become our divergence with the same math (refusals: check_config)
        loss_cfg, adapted = loss_config(self.cfg)
        if loss_cfg is None:
            return None
        if adapted:
            log.info(adapted)
        # Embedding tables may be padded beyond the tokenizer (OPT 50272 vs 50265): compare the
        # real shared vocabulary only.
        s_cfg, t_cfg = read_hf_config(student_dir), read_hf_config(teacher_dir)
        real = []
        for c in (s_cfg, t_cfg):
            fam = family_for(c["model_type"])
            real.append(fam.real_vocab_size(c) if fam.real_vocab_size else c["vocab_size"])
        s_fam, t_fam = family_for(s_cfg["model_type"]), family_for(t_cfg["model_type"])
        if s_fam.is_encoder_decoder != t_fam.is_encoder_decoder:
            raise _setting_error(
                "teacher.checkpoint_dir",
                f"teacher is a {t_cfg['model_type']} and the student a {s_cfg['model_type']}: "
                "both must be decoder-only or both encoder-decoder",
            )
        if real[0] != real[1] and not (s_fam.real_vocab_size or t_fam.real_vocab_size):
            # Tables padded differently over one tokenizer (Qwen2.5 7B 152064 rows vs 0.5B 151936):
            # the tokenizer's ids are the shared vocabulary (_check_same_tokenizer: one tokenizer).
            real = [load_hf_tokenizer(d).vocab_size for d in (student_dir, teacher_dir)]
        if real[0] != real[1]:
            raise _setting_error(
                "teacher.checkpoint_dir",
                f"teacher vocabulary ({real[1]} tokens) differs from the student's ({real[0]}): "
                "distillation needs one tokenizer",
            )
        if s_cfg["vocab_size"] != real[0] or t_cfg["vocab_size"] != real[0]:
            loss_cfg.setdefault("vocab_size", real[0])
        return build_divergence(self.cfg, loss_cfg, self.d2["alpha_min"] if self.d2 is not None else None)

    def _check_same_tokenizer(self, student_dir: str, teacher_dir: str) -> None:
        """Distillation compares the models id by id: the teacher's tokenizer must give every id
        the same text and the same special ids (a swap of two tokens would pass a probe string)."""
        teacher_tok = self._checked("teacher.checkpoint_dir", load_hf_tokenizer, teacher_dir)
        student_tok = self.tokenizer

        def special(tok):
            ids = {k: getattr(tok, k, None) for k in ("vocab_size", "bos_id", "eos_id", "pad_id")}
            return {**ids, "stop_ids": stop_ids(tok)}

        problem = None
        if special(student_tok) != special(teacher_tok):
            problem = f"special ids/vocab {special(teacher_tok)} vs the student's {special(student_tok)}"
        else:
            for i in range(student_tok.vocab_size):
                s_text, t_text = student_tok.decode([i]), teacher_tok.decode([i])
                if s_text != t_text:
                    problem = f"token id {i} is {t_text!r} for the teacher but {s_text!r} for the student"
                    break
        if problem is not None:
            raise _setting_error(
                "teacher.checkpoint_dir",
                f"the teacher's tokenizer in {teacher_dir!r} differs from the student's in {student_dir!r}: "
                f"{problem}; distillation needs one tokenizer",
            )

    def _build_data(self):
        cfg = self.cfg
        train_cfg = cfg.dataset
        if self.method == "seqkd":
            if not cfg.seqkd_data:
                raise _setting_error(
                    "seqkd_data", "method=seqkd needs seqkd_data=<jsonl of teacher responses written by "
                    "python -m distillm_tune.scripts.generate_seqkd>",
                )
            # the teacher's responses to the training prompts: all of them are training data
            train_cfg = OmegaConf.merge(train_cfg, {"source": cfg.seqkd_data, "split": "all"})
        for setting, dcfg in (("dataset.source", train_cfg), ("validation.dataset.source", cfg.validation.dataset)):
            source = str(dcfg.source)
            if not os.path.exists(source):
                raise _setting_error(setting, f"{source!r} does not exist")
            if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "dataset_info.json")):
                raise _setting_error(setting, f"{source!r} is a directory; expected a .jsonl or .json file, or a "
                                              "folder written by datasets' save_to_disk")
        train = self._checked("dataset", config.instantiate, train_cfg, self.tokenizer)
        valid = self._checked("validation.dataset", config.instantiate, cfg.validation.dataset, self.tokenizer)
        # An empty split would train on nothing, or validate to a loss of 0 that drives the scheduler.
        for setting, source, data in (("dataset.source", train_cfg.source, train),
                                      ("validation.dataset.source", cfg.validation.dataset.source, valid)):
            if len(data) == 0:
                raise _setting_error(setting, f"{source!r} gives no usable example ({data.stats.summary()}); "
                                              "expected rows whose prompt and response fit max_prompt_len/max_seq_len")
            self._check_data(setting, source, data)
        if self.is_rank_zero:
            log.info(f"train: {train.stats.summary()}; valid: {valid.stats.summary()}")
        return train, valid

    def _check_data(self, setting: str, source: str, data) -> None:
        """A split that lost most of its rows to the length budget is an error (it would train on,
        or validate with, a biased remainder); many exact duplicates are a warning with counts."""
        stats, limit = data.stats, float(self.guards["max_dropped_fraction"])
        # rows lost to the length budget or as malformed; rows of other splits are not losses
        dropped = sum(n for reason, n in stats.counts.items() if reason.startswith("dropped") or reason == "bad_row")
        if dropped and dropped / (dropped + stats.kept) > limit:
            raise _setting_error(
                setting, f"{source!r} keeps {stats.kept} of {stats.kept + dropped} rows ({stats.summary()}): more than "
                         f"guards.max_dropped_fraction={limit:g} were dropped; raise max_seq_len/max_prompt_len, fix "
                         "the data, or raise guards.max_dropped_fraction")
        samples = [self.io.sample(data[i]) for i in range(len(data))]
        distinct = len({(tuple(x["prompt"]), tuple(x["response"])) for x in samples})
        duplicates = len(samples) - distinct
        if duplicates / len(samples) > float(self.guards["max_duplicate_fraction"]) and self.is_rank_zero:
            log.warning(f"{setting}: {duplicates} of {len(samples)} samples of {source!r} are exact duplicates "
                        f"(more than guards.max_duplicate_fraction={self.guards['max_duplicate_fraction']:g})")

    def _build_pairs(self, teacher_dir: str):
        """distillm2: the training prompts that have a teacher response, each with it (DISTILLM2_SPEC
        §1.1, §1.4). The responses come from ``distillm2.teacher_responses`` (a file written by
        ``generate_seqkd``) or, when null, are generated once here by that same generator on rank 0
        (sgo.temperature / sgo.top_p, seed) into output_dir. Pairing is by prompt token ids; a prompt
        without a teacher response is dropped and counted. Tokenised like the training data, so a
        response ends in exactly one EOS."""
        cfg = self.cfg
        if self.io.is_encoder_decoder:
            raise _setting_error("method", "method=distillm2 is implemented for decoder-only models (the teacher responses "
                                           "come from the dolly-format SeqKD generator); T5/mT5 are not supported")
        path = self.d2["teacher_responses"]
        if path is None:
            path = os.path.join(str(self.output_dir), DISTILLM2_TEACHER_FILE)
            if not (self.resuming and os.path.isfile(path)):  # resume: this run's own file
                run_on_rank_zero(lambda: self._generate_teacher_responses(teacher_dir, path))
        elif not os.path.isfile(str(path)):
            raise _setting_error("distillm2.teacher_responses", f"{path!r} does not exist; expected a .jsonl written by "
                                                                "python -m distillm_tune.scripts.generate_seqkd, or null")
        file_cfg = OmegaConf.merge(cfg.dataset, {"source": str(path), "split": "all"})
        responses = self._checked("distillm2.teacher_responses", config.instantiate, file_cfg, self.tokenizer)
        by_prompt = {tuple(self.io.sample(responses[i])["prompt"]): self.io.sample(responses[i])["response"]
                     for i in range(len(responses))}
        pairs = []
        for i in range(len(self.train_data)):
            prompt = self.io.sample(self.train_data[i])["prompt"]
            if tuple(prompt) in by_prompt:
                pairs.append({"prompt": list(prompt), "response": list(by_prompt[tuple(prompt)])})
        if not pairs:
            raise _setting_error("distillm2.teacher_responses", f"{path!r} answers none of the {len(self.train_data)} "
                                                                "training prompts (pairing is by prompt)")
        if self.is_rank_zero:
            log.info(f"distillm2: {len(pairs)} of {len(self.train_data)} training prompts paired with a teacher "
                     f"response from {path} ({len(self.train_data) - len(pairs)} without one dropped)")
        return pairs

    def _generate_teacher_responses(self, teacher_dir: str, path: str) -> None:
        from distillm_tune.scripts.generate_seqkd import generate_seqkd

        d = self.cfg.dataset
        generate_seqkd(
            teacher_dir, str(d.source), path, batch_size=int(self.cfg.validation.batch_size or self.batch_size),
            max_prompt_len=int(self.cfg.max_prompt_len), max_seq_len=int(self.cfg.max_seq_len),
            temperature=self.sgo_cfg["temperature"], top_p=self.sgo_cfg["top_p"], seed=self.seed,
            split=str(d.get("split", "train")), valid_size=int(d.get("valid_size", 500)),
            test_size=int(d.get("test_size", 500)), split_seed=int(d.get("seed", 1)),
            dtype=self.cfg.dtype, device=str(self.device), template=str(d.get("template", "paper")),
        )

    def _build_lm_data(self):
        """Optional pretraining text for the LM term (``lm.dataset``), with ``lm.coef``."""
        lm = self.cfg.lm
        if lm is None or lm.dataset is None:
            return None, 0.0, 0
        if self.io.is_encoder_decoder:
            raise _setting_error("lm.dataset", "the LM term is for decoder-only students")
        if not os.path.exists(str(lm.dataset.source)):
            raise _setting_error("lm.dataset.source", f"{lm.dataset.source!r} does not exist")
        data = config.instantiate(lm.dataset, self.tokenizer)
        if len(data) == 0:
            raise _setting_error("lm.dataset", "holds no full block of max_seq_len tokens")
        return data, float(lm.coef), int(lm.batch_size or self.batch_size)

    def _lm_batch(self, micro_index: int) -> Dict[str, torch.Tensor]:
        """This rank's LM blocks for the global micro-batch ``micro_index`` (cycling the corpus)."""
        g = self.lm_batch_size * self.world_size
        start = micro_index * g + self.rank * self.lm_batch_size
        return collate_packed([self.lm_data[(start + j) % len(self.lm_data)] for j in range(self.lm_batch_size)])

    def _load_model(self, setting: str, checkpoint_dir: str, lora: Optional[LoRASettings], trainable: bool,
                    dtype: torch.dtype) -> nn.Module:
        model = self._checked(setting, load_hf, checkpoint_dir, dtype=dtype, lora=lora)  # refuses NaN/inf weights
        if trainable and lora is not None:
            set_trainable_params(model, get_adapter_params(model))
        elif not trainable:
            model.requires_grad_(False)
            model.eval()
        if trainable and self.cfg.enable_activation_checkpointing:
            training.set_activation_checkpointing(model, auto_wrap_policy=set(LAYER_CLASSES))
        quantized = not trainable and self.cfg.teacher.quantization is not None
        if self.cfg.compile:  # per layer, as torchtune does: one compiled graph reused by every layer
            for layer in (m for m in model.modules() if isinstance(m, LAYER_CLASSES)):
                layer.compile()
        model.to(self.device)
        if quantized:
            before = model_bytes(model)
            n = quantize_frozen(model, self.cfg.teacher.quantization, LAYER_CLASSES)
            if self.is_rank_zero:
                log.info(f"teacher.quantization={self.cfg.teacher.quantization}: {n} linear layers quantized, "
                         f"teacher weights {before / 2**20:.1f} -> {model_bytes(model) / 2**20:.1f} MiB")
        # A quantized teacher is kept whole on every rank (its forward then needs no collective).
        if self.distributed and not quantized:
            # Teacher sharded like the student: its memory is split across ranks too. Mixed
            # precision: the student's fp32 shards are gathered as bf16 for compute and its
            # gradients reduced in fp32 (the teacher is bf16 already, and has no gradients).
            mp_policy = None
            if trainable and self.mixed_precision is not None:
                mp_policy = MixedPrecisionPolicy(param_dtype=self.mixed_precision, reduce_dtype=torch.float32)
            shard_layers(model, LAYER_CLASSES, mp_policy)
        return model

    @contextlib.contextmanager
    def _compute(self):
        """The context of every forward (student and teacher, training, validation, generation):
        with ``mixed_precision`` on one process, ``torch.autocast`` to bf16; otherwise nothing
        (fp32, pure bf16, or FSDP2's mixed-precision policy, which casts inside the model)."""
        if self.mixed_precision is None or self.distributed:
            yield
            return
        with torch.autocast(device_type=self.device.type, dtype=self.mixed_precision):
            yield

    # ------------------------------------------------------------------------------------- data

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
        return torch.randperm(len(self.train_data), generator=g)

    def _dataset_samples(self, order: torch.Tensor, micro_index: int) -> List[Dict[str, List[int]]]:
        """This rank's share of global micro-batch ``micro_index``: the global batch is the same
        whatever the number of ranks, so runs on 1 and N processes see the same data."""
        g = self.batch_size * self.world_size
        idx = order[micro_index * g : (micro_index + 1) * g][self.rank :: self.world_size]
        return [self.io.sample(self.train_data[int(i)]) for i in idx]

    # ------------------------------------------------------------------------------------- train

    def _generate(self, samples: List[Dict[str, List[int]]], generator: Optional[torch.Generator] = None,
                  **overrides) -> List[Dict[str, List[int]]]:
        """The student's responses (``sgo.*`` sampling unless overridden), in the compute precision;
        ``generator`` defaults to this rank's sampling stream."""
        kwargs = {**self.sgo_cfg, **overrides}
        with self._compute():
            return self.io.generate(self.student, samples, max_new_tokens=self.max_new_tokens,
                                    generator=self.sample_gen if generator is None else generator,
                                    dtype=self.compute_dtype, device=self.device, **kwargs)

    def _degenerate_rows(self, responses: List[Optional[List[int]]]) -> List[bool]:
        """Which student responses are degenerate (empty, EOS-only, repetitive: ``sgo.guard``)."""
        stops, limit = stop_ids(self.tokenizer), float(self.guards["max_repeated_ngram_fraction"])
        return [r is not None and degenerate_reason(r, stops, limit) is not None for r in responses]

    def _prepare_micro_batch(self, order: torch.Tensor, micro_index: int) -> Tuple[str, Dict[str, Any]]:
        u = shared_uniform(self.policy_gen)  # drawn by every method, so the policy stream never depends on it
        if self.method == "distillm2":
            return "pairs", self._pair_batch(order, micro_index)
        samples = self._dataset_samples(order, micro_index)
        source = choose_source(
            self.method, u, step=self.global_step, scheduler=self.scheduler,
            buffer_len=len(self.buffer), batch_size=len(samples), gkd_sgo_prob=self.gkd_sgo_prob,
        )
        if source != "dataset" and self.global_step < self.sgo_start:
            source = "dataset"  # sgo.start_after_steps: the student is not trusted to generate yet
        degenerate: List[bool] = []
        if source == "sgo":
            samples = self._generate(samples)
            degenerate = self._degenerate_rows([s["response"] for s in samples])
            if self.method == "distillm":  # never replayed later either
                self.buffer.push([s for s, bad in zip(samples, degenerate) if not bad])
        elif source == "replay":
            samples = self.buffer.sample(len(samples), self.buffer_gen)
        batch = self.io.collate(samples)
        batch["n_degenerate"] = sum(degenerate)
        if self.guards["degenerate_sgo"] == "skip":
            for i, bad in enumerate(degenerate):
                if bad:  # out of the loss and of the step's token count
                    batch["labels"][i] = CROSS_ENTROPY_IGNORE_IDX
        return source, batch

    # ---------------------------------------------------------------------------- distillm2 data

    def _with_one_eos(self, prompt: List[int], response: List[int]) -> List[int]:
        """The response up to its stop token, cut to fit max_seq_len, ending in exactly one stop
        token (EOS appended when the sampler hit max_new_tokens): DISTILLM2_SPEC §1.6, without the
        chat-template tokens the released code also labels (§4.7)."""
        stops = set(stop_ids(self.tokenizer))
        end = [response[-1]] if response and response[-1] in stops else [self.tokenizer.eos_id]
        body = response[:-1] if response and response[-1] in stops else list(response)
        return body[: max(0, int(self.cfg.max_seq_len) - len(prompt) - 1)] + end

    def _ensure_student_responses(self, order: torch.Tensor) -> float:
        """distillm2, at the start of every epoch (DISTILLM2_SPEC §1.2, Alg. 1 lines 3-7): one response
        per prompt the epoch trains on (every prompt, unless max_steps_per_epoch ends the epoch
        early: the others would never be read) from the current student; none inside an epoch.
        Returns the seconds spent.

        Batch j is the epoch's global micro-batch j (``batch_size x world_size`` prompts), sampled by
        rank j mod world_size with a generator seeded by (seed, epoch, j); then all ranks gather all
        responses. So the responses do not depend on the number of processes, and every rank runs
        the same number of generate calls (a rank without a batch left repeats batch 0 and discards
        it: FSDP's lockstep). Kept in the checkpoint, so a resumed run trains on the responses of
        its epoch. Before ``sgo.start_after_steps`` no response is sampled and the SRKL term is off
        for the epoch.
        """
        if self.responses_epoch == self.epoch:
            return 0.0
        t0 = time.perf_counter()
        if self.global_step < self.sgo_start:
            self.student_responses, self.responses_epoch = None, self.epoch
            return 0.0
        n, bs = len(self.train_data), self.batch_size * self.world_size
        used = [int(i) for i in order[: self.steps_per_epoch * self.grad_accum * bs]]
        batches = [used[i : i + bs] for i in range(0, len(used), bs)]
        mine: Dict[int, List[List[int]]] = {}
        for r in range(math.ceil(len(batches) / self.world_size)):
            j = r * self.world_size + self.rank
            idx = batches[j] if j < len(batches) else batches[0]
            gen = torch.Generator(device=self.device).manual_seed(
                (self.seed * 1_000_003 + self.epoch * 10_007 + j) % (2**63 - 1))
            out = self._generate([self.train_data[i] for i in idx], generator=gen)
            if j < len(batches):
                mine[j] = [o["response"] for o in out]
        parts = [mine]
        if self.distributed:
            parts = [None] * self.world_size
            dist.all_gather_object(parts, mine)
        responses: List[Optional[List[int]]] = [None] * n
        for part in parts:
            for j, rows in part.items():
                for i, response in zip(batches[j], rows):
                    responses[i] = self._with_one_eos(self.train_data[i]["prompt"], response)
        self.student_responses, self.responses_epoch = responses, self.epoch
        if self.is_rank_zero:
            bad = sum(self._degenerate_rows(responses))
            log.info(f"distillm2 epoch {self.epoch + 1}: sampled {len(used)} student responses ({bad} degenerate) "
                     f"in {time.perf_counter() - t0:.1f}s")
        return time.perf_counter() - t0

    def _pair_batch(self, order: torch.Tensor, micro_index: int) -> Dict[str, Any]:
        """This rank's pairs of global micro-batch ``micro_index``: B teacher-response rows, then the
        student's responses to the same B prompts (DISTILLM2_SPEC §1.5). A student row without a
        response (before SGO starts) or with a degenerate one (guards.degenerate_sgo=skip) is masked:
        its pair trains on the SKL term only."""
        g = self.batch_size * self.world_size
        idx = [int(i) for i in order[micro_index * g : (micro_index + 1) * g][self.rank :: self.world_size]]
        teacher = [self.train_data[i] for i in idx]
        responses = [None if self.student_responses is None else self.student_responses[i] for i in idx]
        degenerate = self._degenerate_rows(responses)
        student = [{"prompt": t["prompt"], "response": r if r is not None else [self.tokenizer.eos_id]}
                   for t, r in zip(teacher, responses)]
        batch = self.io.collate(teacher + student)
        skip = self.guards["degenerate_sgo"] == "skip"
        for k, (r, bad) in enumerate(zip(responses, degenerate)):
            if r is None or (bad and skip):
                batch["labels"][len(idx) + k] = CROSS_ENTROPY_IGNORE_IDX
        batch["num_pairs"] = len(idx)
        batch["n_degenerate"] = sum(degenerate)
        return batch

    def _curriculum_active(self) -> bool:
        # Table 11: no curriculum in the first epoch
        return bool(self.d2["curriculum_alpha"]) and self.epoch >= 1

    @torch.no_grad()
    def _gaps(self, student_logits, teacher_logits, labels: torch.Tensor, num_pairs: int):
        """(p̄ − q̄ on teacher rows [B], q̄ − p̄ on student rows [B], student rows that count [B])."""
        vocab = self.loss_fn.vocab_size
        p_bar = sequence_mean_logprob(teacher_logits, labels, vocab_size=vocab, temperature=self.loss_fn.temperature).exp()
        q_bar = sequence_mean_logprob(student_logits, labels, vocab_size=vocab, temperature=self.loss_fn.temperature).exp()
        kept = (labels[num_pairs:] != CROSS_ENTROPY_IGNORE_IDX).any(-1)
        return (p_bar - q_bar)[:num_pairs], (q_bar - p_bar)[num_pairs:], kept

    @torch.no_grad()
    def _set_anchors(self, micro: List[Dict[str, Any]]) -> None:
        """The alpha curriculum's anchors m_t = mean(p̄ − q̄) over teacher rows and m_s = mean(q̄ − p̄)
        over student rows, of the epoch's first step (all its micro-batches, all ranks), fixed for
        the epoch. The released code means the same but never reaches it (DISTILLM2_SPEC §4.2)."""
        was_training = self.student.training
        self.student.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        for batch in micro:
            labels = batch["labels"].to(self.device)
            with self._compute():
                s_logits = self.io.forward(self.student, batch, self.device)
                t_logits = self.io.forward(self.teacher, batch, self.device)
            gap_t, gap_s, kept = self._gaps(s_logits, t_logits, labels, batch["num_pairs"])
            sums += torch.stack([gap_t.double().sum(), torch.tensor(float(len(gap_t)), device=self.device),
                                 (gap_s.double() * kept).sum(), kept.double().sum()])
        self.student.train(was_training)
        all_reduce_sum(sums)
        m_t, m_s = float(sums[0] / sums[1].clamp(min=1)), float(sums[2] / sums[3].clamp(min=1))
        self.d2_anchors = (self.epoch, m_t, m_s)
        if self.is_rank_zero:
            log.info(f"distillm2 epoch {self.epoch + 1}: alpha curriculum anchors m_t={m_t:.4g}, m_s={m_s:.4g}")

    def _distillm2_sums(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Σ_i L_i over the micro-batch's pairs, CE sum (logged only), statistics): one student
        forward with gradients and one teacher forward without on all 2B rows (DISTILLM2_SPEC §5.2)."""
        labels = batch["labels"].to(self.device)
        B = batch["num_pairs"]
        with self._compute():
            s_logits = self.io.forward(self.student, batch, self.device)
            with torch.no_grad():
                t_logits = self.io.forward(self.teacher, batch, self.device)
        with torch.no_grad():  # logged only (kd_ratio = 1): no graph, no backward pass over [tokens, V]
            ce_sum, _ = cross_entropy_sum_and_count(s_logits, labels)
        gap_t, gap_s, kept = self._gaps(s_logits, t_logits, labels, B)
        alpha0, alpha_min = self.loss_fn.alpha, self.d2["alpha_min"]
        if self._curriculum_active():
            _, m_t, m_s = self.d2_anchors
            alpha_t, alpha_s = adaptive_alpha(gap_t, m_t, alpha0, alpha_min), adaptive_alpha(gap_s, m_s, alpha0, alpha_min)
        else:
            alpha_t = alpha_s = None
        b = gradual_beta_b(self.step_in_epoch, self.steps_per_epoch) if self.d2["gradual_beta"] else 1.0
        terms = self.loss_fn.pair_losses(s_logits, t_logits, labels, b=b, alpha_t=alpha_t, alpha_s=alpha_s)
        a_t = torch.full((B,), alpha0, device=self.device) if alpha_t is None else alpha_t.to(self.device)
        a_s = torch.full((B,), alpha0, device=self.device) if alpha_s is None else alpha_s.to(self.device)
        inf = torch.tensor(float("inf"), device=self.device)
        stats = torch.stack([
            terms["skl"].detach().sum(), terms["srkl"].detach().sum(), gap_t.sum(), (gap_s * kept).sum(),
            kept.float().sum(), a_t.sum(), (a_s * kept).sum(), torch.tensor(float(batch["n_degenerate"]), device=self.device),
            # minima and maxima, negated where needed so that one MAX all-reduce takes them all
            -a_t.min(), a_t.max(), -torch.where(kept, a_s, inf).min(), torch.where(kept, a_s, -inf).max(),
        ]).float()
        return terms["loss"].sum(), ce_sum, stats

    def _loss_sums(self, batch: Dict[str, Any]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kd_ratio·D + (1−kd_ratio)·CE, D, CE) as sums over the batch's unmasked tokens; the first
        carries the gradient, the other two are for the metrics. The models run in ``_compute()``
        (bf16 under mixed precision); the losses upcast their inputs and compute in fp32 (the fused
        loss applies the head chunk by chunk inside ``_compute()``, as the model's own head would
        be applied, and its divergence and CE in fp32)."""
        labels = batch["labels"].to(self.device)
        if self.fused_loss is not None:
            return self._fused_loss_sums(batch, labels)
        with self._compute():
            student_logits = self.io.forward(self.student, batch, self.device)
        # kd_ratio = 1: the CE is only logged; with a graph it would keep its log-softmax [tokens, V]
        # until backward and pay a backward pass over it, for a gradient multiplied by 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.kd_ratio < 1.0):
            ce_sum, _ = cross_entropy_sum_and_count(student_logits, labels)
        if self.loss_fn is None or self.kd_ratio == 0.0:
            div_sum = torch.zeros((), device=self.device)
        else:
            with torch.no_grad(), self._compute():
                teacher_logits = self.io.forward(self.teacher, batch, self.device)
            div_sum, _ = self.loss_fn.sum_and_count(student_logits, teacher_logits, labels)
            div_sum = div_sum.float()
        return self.kd_ratio * div_sum + (1.0 - self.kd_ratio) * ce_sum, div_sum, ce_sum

    def _fused_loss_sums(self, batch: Dict[str, Any], labels: torch.Tensor):
        """``_loss_sums`` with ``fused_loss_chunk_size``: one chunked pass over both heads gives
        the loss with the gradients of both terms, and the D and CE sums logged (no second pass).

        The loss runs inside the student's forward, in place of its head (``io.forward_loss``):
        under FSDP2 the student's root pre-forward hook has all-gathered its embeddings, norm and
        head (tied or not), its backward hooks reduce-scatter their gradients (the loss hands
        autograd the head's gradient, computed chunk by chunk in the forward). The teacher's root
        group stays gathered after the teacher's forward (``_build_fused_loss``) and is resharded
        right after the loss. Every rank runs the same forwards and collectives in the same order;
        only the number of chunks (no collective in them) depends on the rank's tokens."""
        with self._compute():
            with torch.no_grad():
                t_hidden, _, _ = self.io.forward_hidden(self.teacher, batch, self.device)
            try:
                if isinstance(self.teacher, FSDPModule):
                    self.teacher.unshard()  # a no-op: gathered by its forward
                t_weight, t_bias = output_projection(self.teacher)

                def loss_of_hidden(hidden, weight, bias):
                    return self.fused_loss.loss_sums(hidden, weight, t_hidden, t_weight, labels, bias, t_bias,
                                                     kd_ratio=self.kd_ratio)

                loss_sum, div_sum, ce_sum, _ = self.io.forward_loss(self.student, batch, self.device, loss_of_hidden)
            finally:
                if isinstance(self.teacher, FSDPModule):
                    self.teacher.reshard()
        return loss_sum.float(), div_sum.float(), ce_sum.float()

    def _train_step(self, order: torch.Tensor) -> Dict[str, float]:
        t0 = time.perf_counter()
        micro, sources, lm_batches, gen_time = [], [], [], 0.0
        for k in range(self.grad_accum):
            g0 = time.perf_counter()
            source, batch = self._prepare_micro_batch(order, self.step_in_epoch * self.grad_accum + k)
            if source == "sgo":
                gen_time += time.perf_counter() - g0
            micro.append(batch)
            sources.append(source)
            if self.lm_data is not None:
                lm_batches.append(self._lm_batch(self.global_step * self.grad_accum + k))
        # Normalise over every token of the step, on every rank (not a mean of micro-batch means);
        # the LM term over its own tokens.
        counts = all_reduce_sum(torch.tensor(
            [float(sum((b["labels"] != CROSS_ENTROPY_IGNORE_IDX).sum() for b in batches)) for batches in (micro, lm_batches)]
            + [float(sum(b.get("num_pairs", 0) for b in micro)), float(sum(b.get("n_degenerate", 0) for b in micro))],
            device=self.device,
        ))
        n_tokens = counts[0]
        denom, lm_denom = counts[:2].clamp(min=1.0)
        # distillm2: the mean over the step's pairs (DISTILLM2_SPEC §2.3); the others: over its tokens
        div_denom = counts[2].clamp(min=1.0) if self.d2 is not None else denom
        sums = torch.zeros(3, device=self.device)
        d2_stats = torch.zeros(12, device=self.device) if self.d2 is not None else None
        if self.d2 is not None and self._curriculum_active() and (self.d2_anchors is None or self.d2_anchors[0] != self.epoch):
            self._set_anchors(micro)
        self.student.train()
        for i, batch in enumerate(micro):
            if self.d2 is not None:
                div_sum, ce_sum, st = self._distillm2_sums(batch)
                d2_stats[:8] += st[:8]
                d2_stats[8:] = st[8:] if i == 0 else torch.maximum(d2_stats[8:], st[8:])
                loss_sum = self.kd_ratio * div_sum + (1.0 - self.kd_ratio) * ce_sum
            else:
                loss_sum, div_sum, ce_sum = self._loss_sums(batch)
            loss = loss_sum / div_denom
            lm_sum = torch.zeros((), device=self.device)
            if lm_batches:
                with self._compute():
                    lm_logits = self.student(lm_batches[i]["tokens"].to(self.device))
                lm_sum, _ = cross_entropy_sum_and_count(lm_logits, lm_batches[i]["labels"].to(self.device))
                loss = loss + self.lm_coef * lm_sum / lm_denom
            # FSDP averages gradients over ranks; the loss is already a global token mean.
            (loss * self.world_size).backward()
            sums += torch.stack([div_sum.detach(), ce_sum.detach(), lm_sum.detach()])
        params = [p for p in self.student.parameters() if p.requires_grad]
        # the norm is needed for the non-finite guard even when nothing is clipped
        if self.clip_grad_norm is None:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm=float(self.clip_grad_norm))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        all_reduce_sum(sums)
        if d2_stats is not None:
            all_reduce_sum(d2_stats[:8])
            if self.distributed:
                dist.all_reduce(d2_stats[8:], op=dist.ReduceOp.MAX)
        # Decided on values equal on every rank (all-reduced sums, the global norm): all ranks
        # skip or stop in the same step.
        bad_term = self._nonfinite_term(sums, grad_norm)
        if bad_term is None:
            self.optimizer.step()
            self._nonfinite_run = 0
        else:
            self._on_nonfinite(bad_term, micro)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        div, ce = float(sums[0] / div_denom), float(sums[1] / denom)
        lm = float(sums[2] / lm_denom)
        elapsed = time.perf_counter() - t0
        metrics = {
            "loss": self.kd_ratio * div + (1.0 - self.kd_ratio) * ce + self.lm_coef * lm,
            "loss_div": div,
            "loss_ce": ce,
            "loss_lm": lm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "gen_time_share": gen_time / elapsed,
            "tokens_per_sec": float(n_tokens) / elapsed,
            "step_time": elapsed,
            "epoch": self.epoch,
        }
        if self.method == "distillm":  # the adaptive scheduler and the replay buffer are DistiLLM's alone
            metrics.update(phi=self.scheduler.phi, lambda_r=self.scheduler.sgo_prob(self.global_step),
                           buffer_fill=len(self.buffer) / self.buffer.capacity)
        if self.d2 is not None:
            metrics.update(self._distillm2_metrics(d2_stats, counts[2]))
        else:
            for s in SOURCES:
                metrics[f"source_{s}"] = sources.count(s) / len(sources)
        if self.method in SGO_METHODS:
            metrics["sgo_degenerate"] = float(counts[3])
            self._warn_degenerate(int(counts[3]))
        metrics["grad_norm"] = float(grad_norm)
        metrics["skipped_nonfinite"] = float(bad_term is not None)
        return metrics

    def _distillm2_metrics(self, st: torch.Tensor, pairs: torch.Tensor) -> Dict[str, float]:
        """Both loss terms (means over pairs), b, alpha statistics (student rows: those trained on),
        the probability gaps mean(p̄ − q̄) on teacher rows and mean(q̄ − p̄) on student rows."""
        st, n = st.tolist(), max(float(pairs), 1.0)
        kept = st[4]
        out = {
            "loss_skl": st[0] / n, "loss_srkl": st[1] / max(kept, 1.0),
            "b": gradual_beta_b(self.step_in_epoch, self.steps_per_epoch) if self.d2["gradual_beta"] else 1.0,
            "gap_teacher": st[2] / n, "alpha_t_mean": st[5] / n, "alpha_t_min": -st[8], "alpha_t_max": st[9],
            "student_rows_trained": kept,
        }
        if kept > 0:
            out.update(gap_student=st[3] / kept, alpha_s_mean=st[6] / kept, alpha_s_min=-st[10], alpha_s_max=st[11])
        return out

    def _warn_degenerate(self, count: int) -> None:
        if count == 0 or self._degenerate_warned or not self.is_rank_zero:
            return
        self._degenerate_warned = True
        action = ("they were left out of the loss" if self.guards["degenerate_sgo"] == "skip"
                  else "they were trained on (guards.degenerate_sgo=keep)")
        log.warning(f"step {self.global_step + 1}: {count} student-generated output(s) are degenerate (empty, EOS-only or "
                    f"repetitive); {action}. The student needs SFT first (train it with method=sft, then distil from "
                    "that checkpoint), or delay SGO with sgo.start_after_steps. Counted per step as metric sgo_degenerate")

    def _nonfinite_term(self, sums: torch.Tensor, grad_norm: torch.Tensor) -> Optional[str]:
        """The first term of the step's loss that is NaN/inf, then the gradient norm; None if all are finite."""
        used = (("divergence", self.kd_ratio > 0), ("cross-entropy", self.kd_ratio < 1),
                ("LM", self.lm_data is not None and self.lm_coef > 0))
        for (name, in_loss), value in zip(used, sums.tolist()):
            if in_loss and not math.isfinite(value):
                return name
        return None if math.isfinite(float(grad_norm)) else "gradient norm"

    @torch.no_grad()
    def _teacher_output_nonfinite(self, micro: List[Dict[str, Any]]) -> bool:
        """Whether the teacher's outputs on the step's batches hold NaN/inf (on any rank): run only
        when the divergence is not finite, to say which model is at fault."""
        bad = torch.zeros(1, device=self.device)
        for batch in micro:
            with self._compute():
                if self.fused_loss is not None:
                    out = [self.io.forward_hidden(self.teacher, batch, self.device)[0]]
                    if isinstance(self.teacher, FSDPModule):
                        self.teacher.reshard()  # its root group stays gathered after a forward
                else:
                    out = self.io.forward(self.teacher, batch, self.device)
                out = out if isinstance(out, list) else [out]
            bad += float(any(not torch.isfinite(o).all() for o in out))
        return bool(all_reduce_sum(bad).item() > 0)

    def _on_nonfinite(self, term: str, micro: List[Dict[str, Any]]) -> None:
        if term == "divergence" and self.teacher is not None and self._teacher_output_nonfinite(micro):
            culprit = f"the teacher's outputs hold NaN/inf (teacher.checkpoint_dir={self.cfg.teacher.checkpoint_dir})"
        else:
            culprit = "the student's outputs or gradients (a learning rate too high? optimizer.lr=" \
                      f"{self.cfg.optimizer.get('lr')})"
        self._nonfinite_run += 1
        message = f"step {self.global_step + 1}: the {term} {'is' if term == 'gradient norm' else 'term is'} not finite; source: {culprit}"
        action, limit = self.guards["on_nonfinite"], int(self.guards["max_nonfinite_steps"])
        if action == "stop" or self._nonfinite_run >= limit:
            raise RunStopped(
                f"{message}. Stopped (guards.on_nonfinite={action}, {self._nonfinite_run} such step(s) in a row); "
                f"the last checkpoint ({self.checkpointer.latest() or 'none'}) and earlier exports are kept, "
                "nothing was exported"
            )
        if self.is_rank_zero:
            log.warning(f"{message}; the step was skipped ({self._nonfinite_run} in a row, the run stops at {limit})")

    def train(self) -> None:
        try:
            self._train()
        except BaseException:
            self._abandon_output_dir()  # no-op once the first step was taken
            raise

    def _train(self) -> None:
        cfg = self.cfg
        val_every = cfg.validation.every_n_steps
        save_every = cfg.save_every_n_steps
        log_every = int(cfg.log_every_n_steps)
        pbar = tqdm(total=self.total_steps, initial=self.global_step, disable=not self.is_rank_zero,
                    desc=f"{self.method}", dynamic_ncols=True)
        self.profiler.start()
        while self.epoch < int(cfg.epochs):
            order = self._epoch_order(self.epoch)
            # distillm2: this epoch's student responses (restored ones after a resume inside it)
            sampling_time = self._ensure_student_responses(order) if self.d2 is not None else 0.0
            while self.step_in_epoch < self.steps_per_epoch:
                t0 = time.perf_counter() - sampling_time  # the epoch's sampling counts into its first step's time
                metrics = self._train_step(order)
                if sampling_time:
                    metrics["student_sampling_time"], sampling_time = sampling_time, 0.0
                self.global_step += 1
                self.step_in_epoch += 1
                if self.output_claim is not None:  # the new run stands: an earlier one it replaces goes
                    self.output_claim.commit()
                end_of_epoch = self.step_in_epoch == self.steps_per_epoch
                if end_of_epoch:
                    self.epoch += 1
                    self.step_in_epoch = 0
                if (val_every and self.global_step % int(val_every) == 0) or (end_of_epoch and not val_every):
                    metrics.update(self._validate())
                    if metrics.get("val_rouge_l", float("-inf")) > self.best_rouge:
                        # the paper reports the checkpoint with the best validation ROUGE-L
                        self.best_rouge = metrics["val_rouge_l"]
                        self.export("hf_model_best", "peft_adapter_best")
                self.train_time += time.perf_counter() - t0
                metrics["train_time"] = self.train_time
                if cfg.log_peak_memory_stats:
                    metrics.update(peak_memory_stats(self.device))
                self.profiler.step()
                if self.metric_logger is not None and (self.global_step % log_every == 0 or "val_loss" in metrics):
                    self.metric_logger.log_dict(metrics, step=self.global_step)
                pbar.update(1)
                pbar.set_postfix(loss=f"{metrics['loss']:.4f}", **({"phi": f"{metrics['phi']:.1f}"} if "phi" in metrics else {}))
                if self.global_step < self.total_steps and save_every and self.global_step % int(save_every) == 0:
                    self.save_checkpoint()
                if end_of_epoch:
                    break
        pbar.close()
        self.profiler.stop()
        self.save_checkpoint()
        if self.diverged:  # never let a diverged student take the place of a good export
            self.export("hf_model_diverged", "peft_adapter_diverged")
        else:
            self.export()

    # -------------------------------------------------------------------------------- validation

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Student token-mean CE on the validation responses, over all ranks."""
        was_training = self.student.training
        self.student.eval()
        # The same examples whatever the number of ranks, so the scheduler sees the same loss.
        n = len(self.valid_data)
        if self.cfg.validation.max_examples is not None:
            n = min(n, int(self.cfg.validation.max_examples))
        bs = int(self.cfg.validation.batch_size or self.batch_size)
        sums = torch.zeros(2, device=self.device)
        # Every rank runs the same number of forward passes (FSDP all-gathers inside each one);
        # a rank whose share runs out feeds a fully masked dummy batch.
        n_batches = math.ceil(n / (bs * self.world_size))
        for b in range(n_batches):
            idx = list(range(n))[b * bs * self.world_size : (b + 1) * bs * self.world_size][self.rank :: self.world_size]
            samples = [self.io.sample(self.valid_data[i]) for i in idx]
            dummy = not samples
            batch = self.io.collate(samples or [self.io.sample(self.valid_data[0])])
            if dummy:
                batch["labels"].fill_(CROSS_ENTROPY_IGNORE_IDX)
            with self._compute():
                logits = self.io.forward(self.student, batch, self.device)
            ce_sum, count = cross_entropy_sum_and_count(logits, batch["labels"].to(self.device))
            sums += torch.stack([ce_sum.float(), count.float()])
        all_reduce_sum(sums)
        self.student.train(was_training)
        return float(sums[0] / sums[1].clamp(min=1.0))

    def _validate(self) -> Dict[str, float]:
        val_loss = self.validation_loss()
        self._check_divergence(val_loss)
        out = {"val_loss": val_loss}
        if self.method == "distillm":
            out["phi_increased"] = float(self.scheduler.update(val_loss))
            out["phi"] = self.scheduler.phi
        n_rouge = int(self.cfg.validation.rouge_examples)
        if n_rouge > 0:
            out["val_rouge_l"] = self.validation_rouge(n_rouge)
        return out

    def _check_divergence(self, val_loss: float) -> None:
        """Stop (or warn) when the validation loss is NaN/inf or above ``guards.max_val_loss_ratio``
        times its first value; the first finite value is the reference."""
        if self.first_val_loss is None and math.isfinite(val_loss):
            self.first_val_loss = val_loss
            return
        ratio = float(self.guards["max_val_loss_ratio"])
        first = self.first_val_loss
        if math.isfinite(val_loss) and (first is None or first <= 0 or val_loss <= ratio * first):
            self.diverged = False
            return
        why = "is not finite" if not math.isfinite(val_loss) else f"exceeds {ratio:g} x its first value {first:.4g}"
        message = f"step {self.global_step}: validation loss {val_loss:.4g} {why}: the run diverged"
        if self.guards["on_divergence"] == "stop":
            raise RunStopped(
                f"{message}. Stopped (guards.on_divergence=stop); the last checkpoint "
                f"({self.checkpointer.latest() or 'none'}) and earlier exports are kept, nothing was exported"
            )
        self.diverged = True
        if self.is_rank_zero:
            log.warning(f"{message}; continuing (guards.on_divergence=warn): the final student will be exported "
                        "to hf_model_diverged, not hf_model")

    @torch.no_grad()
    def validation_rouge(self, n_examples: int) -> float:
        """Greedy ROUGE-L (spec §5 scoring) of the student on the first validation examples."""
        from distillm_tune.eval.metrics import rouge_l

        n = min(n_examples, len(self.valid_data))
        bs = int(self.cfg.validation.batch_size or self.batch_size)
        local = torch.zeros(2, device=self.device)
        # batches of validation.batch_size per rank, the same number on every rank (lockstep)
        for b in range(math.ceil(n / (bs * self.world_size))):
            idx = list(range(n))[b * bs * self.world_size : (b + 1) * bs * self.world_size][self.rank :: self.world_size]
            out = self._generate([self.io.sample(self.valid_data[i]) for i in (idx or [0])], temperature=0.0)
            if not idx:
                continue
            preds = [self.tokenizer.decode(cut_at_stop(s["response"], stop_ids(self.tokenizer))).strip() for s in out]
            refs = [self.io.references(self.valid_data, i) for i in idx]
            local += torch.tensor([rouge_l(preds, refs) * len(idx), float(len(idx))], device=self.device)
        all_reduce_sum(local)
        return float(local[0] / local[1].clamp(min=1.0))

    # ------------------------------------------------------------------------------ checkpoints

    def _state_dict_options(self) -> StateDictOptions:
        """This rank's shards, no gather: DTensors under FSDP2, whole tensors in one process; the
        trainable weights only (LoRA: the adapters; the frozen base comes from student.checkpoint_dir).
        Not strict when set: DCP's load already refuses a key the checkpoint lacks, and the frozen
        weights are meant to be absent."""
        return StateDictOptions(full_state_dict=False, cpu_offload=False, ignore_frozen_params=self.lora is not None,
                                strict=False)

    def save_checkpoint(self) -> str:
        """All training state, so that ``resume_from_checkpoint=True`` continues exactly. Weights
        and optimizer state are written by every rank as its own shards (DCP, no gather)."""
        # Before the first optimizer step (every step so far skipped) the optimizer has no state, and
        # get_state_dict initialises it with a zero-learning-rate step: saved like that, then emptied
        # again, so that the run (AdamW counts its steps) goes on as if nothing had been saved.
        optimizer_empty = not self.optimizer.state
        model_state, optimizer_state = get_state_dict(self.student, self.optimizer, options=self._state_dict_options())
        recipe_state = {
            "run_id": self.checkpointer.run_id,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "global_step": self.global_step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "train_time": self.train_time,
            "best_rouge": self.best_rouge,
            "first_val_loss": self.first_val_loss,
            "diverged": self.diverged,
            "scheduler": self.scheduler.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "policy_gen": self.policy_gen.get_state(),
            "method": self.method,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world_size,
            "optimizer_empty": optimizer_empty,
            **({"distillm2": self._distillm2_state()} if self.d2 is not None else {}),
        }
        per_rank = {
            "buffer": self.buffer.state_dict(),
            "sample_gen": self.sample_gen.get_state(),
            "buffer_gen": self.buffer_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if self.device.type == "cuda" else None,
        }
        try:
            path = self.checkpointer.save(self.global_step, recipe_state, per_rank,
                                          {"model": model_state, "optimizer": optimizer_state})
        finally:
            if optimizer_empty:
                self.optimizer.state.clear()
        if self.is_rank_zero:
            log.info(f"saved training state at step {self.global_step} to {path}")
        return path

    def _distillm2_state(self) -> Dict[str, Any]:
        """The round's student responses (flat int32 ids + lengths; length -1: no response, a prompt
        the epoch does not train on) and anchors: they came from a student that no longer exists,
        so resume must read them, not resample."""
        responses = self.student_responses
        state: Dict[str, Any] = {"responses_epoch": self.responses_epoch, "anchors": self.d2_anchors, "responses": None}
        if responses is not None:
            lengths = torch.tensor([-1 if r is None else len(r) for r in responses], dtype=torch.int64)
            flat = [t for r in responses if r is not None for t in r]
            state["responses"] = {"ids": torch.tensor(flat, dtype=torch.int32), "lengths": lengths}
        return state

    def _load_distillm2_state(self, state: Dict[str, Any]) -> None:
        self.responses_epoch, self.d2_anchors = state["responses_epoch"], state["anchors"]
        packed = state["responses"]
        if packed is None:
            self.student_responses = None
            return
        ids, lengths = packed["ids"].tolist(), packed["lengths"].tolist()
        bounds = [0] + torch.cumsum(packed["lengths"].clamp(min=0), 0).tolist()
        self.student_responses = [None if n < 0 else ids[a:b] for n, a, b in zip(lengths, bounds[:-1], bounds[1:])]
        if len(self.student_responses) != len(self.train_data):
            raise _setting_error("resume_from_checkpoint", f"the checkpoint holds {len(self.student_responses)} student "
                                                           f"responses but the run pairs {len(self.train_data)} prompts")

    def _find_resume_checkpoint(self, set_aside_corrupt: bool = True) -> str:
        """Rank 0 picks the newest intact checkpoint of the run (verified against its manifest);
        a corrupt newer one is set aside with a warning naming both. Every rank gets the path."""
        def find() -> str:
            ckpt = self.checkpointer
            try:
                path, skipped = ckpt.find_resumable()
            except ValueError as e:
                raise _setting_error("resume_from_checkpoint", str(e)) from None
            if path is None:
                why = "; ".join(f"{p}: {reason}" for p, reason in skipped)
                raise _setting_error(
                    "resume_from_checkpoint",
                    (f"no intact checkpoint under {ckpt.root!r} to resume from ({why})" if why else
                     f"no checkpoint found under {ckpt.root!r} to resume from")
                    + "; start afresh with overwrite=true or in another output_dir",
                )
            for bad, reason in skipped if set_aside_corrupt else ():
                aside = ckpt.set_aside(bad)
                log.warning(f"checkpoint {bad} is corrupt ({reason}); resuming from {path} instead "
                            f"(the corrupt one is kept as {aside})")
            return path

        return run_on_rank_zero(find)

    def _read_resume_settings(self, path: str) -> Dict[str, Any]:
        """The checkpoint's state, once its settings were compared with this run's (preflight):
        refused changes stop here, the others are logged and applied later."""
        state = self._checked("resume_from_checkpoint", self.checkpointer.load, path, self.world_size)
        # another number of processes only with the same global micro-batch (batch_size x ranks)
        self._resume_changes = config_changes(state["recipe_state"]["config"], OmegaConf.to_container(self.cfg, resolve=True),
                                              path, state["world_size"], self.world_size)
        return state

    def _read_resume_state(self, state: Dict[str, Any], path: str) -> Dict[str, Any]:
        """The checkpoint's state, once its step counts were compared with this run's data."""
        rs = state["recipe_state"]
        if rs.get("steps_per_epoch", self.steps_per_epoch) != self.steps_per_epoch:
            raise _setting_error(
                "dataset.source",
                f"gives {self.steps_per_epoch} steps per epoch but {path!r} was written with "
                f"{rs['steps_per_epoch']}: the training data changed since the checkpoint",
            )
        if rs["global_step"] > self.total_steps:
            raise _setting_error("epochs", f"{self.cfg.epochs} epochs give {self.total_steps} steps, fewer than the "
                                           f"{rs['global_step']} {path!r} has already trained")
        return state

    def _load_student_state(self, path: str) -> None:
        """The checkpoint's trainable weights into this run's student, each rank reading the parts
        of the saved shards that its own shards cover (DCP reshards: N ranks wrote, M read)."""
        options = self._state_dict_options()
        state = get_model_state_dict(self.student, options=options)
        self._checked("resume_from_checkpoint", self.checkpointer.load_sharded, path, "model", state)
        set_model_state_dict(self.student, state, options=options)

    def _resume(self, state: Dict[str, Any], path: str) -> None:
        rs = state["recipe_state"]
        optimizer_state = get_optimizer_state_dict(self.student, self.optimizer, options=self._state_dict_options())
        self._checked("resume_from_checkpoint", self.checkpointer.load_sharded, path, "optimizer", optimizer_state)
        set_optimizer_state_dict(self.student, self.optimizer, optimizer_state, options=self._state_dict_options())
        if rs.get("optimizer_empty"):  # saved before the first optimizer step: no state, as in the run
            self.optimizer.state.clear()
        self.lr_scheduler.load_state_dict(rs["lr_scheduler"])
        apply_optimizer_changes(self.optimizer, self.lr_scheduler, self._resume_changes)
        self.scheduler.load_state_dict(rs["scheduler"])
        self.policy_gen.set_state(rs["policy_gen"])
        self.global_step, self.epoch, self.step_in_epoch = rs["global_step"], rs["epoch"], rs["step_in_epoch"]
        self.train_time, self.best_rouge = rs["train_time"], rs["best_rouge"]
        self.first_val_loss, self.diverged = rs.get("first_val_loss"), rs.get("diverged", False)
        if self.d2 is not None:
            self._load_distillm2_state(rs["distillm2"])
        if state["world_size"] == self.world_size:
            r = state["ranks"][0]
            self.buffer.load_state_dict(r["buffer"])
            self.sample_gen.set_state(r["sample_gen"])
            self.buffer_gen.set_state(r["buffer_gen"])
            torch.set_rng_state(r["torch_rng"])
            if r["cuda_rng"] is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(r["cuda_rng"])
        else:
            self._resume_rank_state_on_new_world(state["ranks"], state["world_size"])
        if self.checkpointer.run_id is None:  # a checkpoint from before run ids: adopt one now
            self.checkpointer.start_run()
        if self.is_rank_zero:
            log.info(f"resumed from {path} at step {self.global_step} (epoch {self.epoch})")

    def _resume_rank_state_on_new_world(self, saved: List[Dict[str, Any]], saved_world: int) -> None:
        """Per-rank state after a change in the number of processes (docs/resume.md). The data
        order and the policy draws are global and continue unchanged. The per-rank streams cannot
        (rank r of M ranks has no counterpart among N): the sampling, replay and torch generators
        are re-seeded from (seed, rank, step), the same on every resume of this step; the replay
        buffers' samples are interleaved in age order and dealt round robin, every rank keeping the
        same number (the policy compares equal lengths on every rank), the newest when over capacity."""
        def seed_for(stream: str) -> int:
            text = f"{self.seed}/{stream}/{self.rank}/{self.global_step}"
            return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)

        self.sample_gen.manual_seed(seed_for("sample"))
        self.buffer_gen.manual_seed(seed_for("buffer"))
        torch.manual_seed(seed_for("torch"))  # also seeds CUDA
        buffers = [r["buffer"]["samples"] for r in saved]
        mine = deal_replay_samples(buffers, self.world_size, self.rank, self.buffer.capacity)
        self.buffer.load_state_dict({"capacity": self.buffer.capacity, "samples": mine})
        if self.is_rank_zero:
            log.warning(
                f"resuming on {self.world_size} rank(s) from a checkpoint written by {saved_world}: the data order "
                "and policy draws continue; per-rank sampling generators re-seeded from (seed, rank, step); replay "
                f"buffer of {sum(map(len, buffers))} samples dealt as {len(mine)} per rank")

    def export(self, name: str = "hf_model", adapter_name: str = "peft_adapter") -> None:
        """The student in Hugging Face format (merged) in ``output_dir/name``, plus a PEFT
        adapter in ``output_dir/adapter_name`` with LoRA. Collective under FSDP."""
        full = (
            training.gather_cpu_state_dict(self.student, self.is_rank_zero)
            if self.distributed
            else {k: v.detach().cpu() for k, v in self.student.state_dict().items()}
        )
        if not self.is_rank_zero:
            return
        out = os.path.join(self.output_dir, name)
        rank_alpha = None if self.lora is None else (self.lora.lora_rank, self.lora.lora_alpha)
        earlier = {p for p in (out, os.path.join(self.output_dir, adapter_name)) if os.path.isdir(p)}
        try:  # both writers build the folder aside and swap it in: a failure leaves the old one
            save_hf_state_dict(full, out, self.student_dir, lora_rank_alpha=rank_alpha)
            if self.lora is not None:
                adapter = {k: v for k, v in full.items() if ".lora_a." in k or ".lora_b." in k}
                out = os.path.join(self.output_dir, adapter_name)
                save_peft_adapter_state_dict(adapter, out, self.student_dir, self.lora)
        except Exception as e:  # noqa: BLE001 - safetensors, torch and the OS each report a full disk their own way
            raise CheckpointWriteError(
                f"could not export the student to {out!r}: {type(e).__name__}: {e}; {free_space(out)} on that file "
                f"system. {'An earlier export there is intact' if out in earlier else 'Nothing was exported there'}; "
                f"the training state is in {self.checkpointer.latest()!r}"
            ) from e
        log.info(f"exported the student in Hugging Face format to {os.path.join(self.output_dir, name)}")

    def cleanup(self) -> None:
        if self.metric_logger is not None:
            self.metric_logger.close()
        if self.output_claim is not None:
            self.output_claim.release()
        if dist.is_initialized():
            dist.destroy_process_group()


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = KDOffPolicyRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
