"""Decoder-only families torchtune 0.6.1 builds itself: Llama 2/3/3.x, Mistral, Qwen2/2.5, Phi-3/4,
Gemma and Gemma 2, loaded from an HF ``config.json`` by ``model_type``.

Nothing here re-implements a model or a weight converter: each family is a row of :data:`_SPECS`
naming torchtune's own component builder, LoRA builder and ``hf_to_tune``/``tune_to_hf``. What this
module adds is what torchtune leaves to its YAML configs:

- ``config.json`` -> builder arguments, in both config forms (transformers 4 ``rope_theta`` /
  ``rope_scaling``, transformers 5 ``rope_parameters``), and a ``ValueError`` naming the config
  key for anything the builder cannot express (another RoPE scaling, biases where the builder has
  none, a head_dim the builder would compute differently, ...): a silently different model is worse
  than a refusal.
- Tied embeddings for every family: torchtune's ``TiedLinear`` replaces the builder's output layer
  when ``tie_word_embeddings`` is set (what ``llama3_2``/``qwen2`` do internally), so the logits,
  ``model_io.output_projection`` (fused loss) and export all see the one embedding table; the
  checkpoint's ``lm_head.weight``, if it has one, is dropped on load and never written on export.
- Key forms other than the hub's (a bare ``LlamaModel`` save without ``model.``), and ``ValueError``s
  naming a bad key instead of torchtune's bare ``Exception``.
- PEFT export of LoRA weights, with the q/k row permutation torchtune applies to base weights of
  the families it permutes, and fused q/k/v, gate/up modules (Phi-3) as one LoRA of higher rank.
"""

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torchtune.models import convert_weights as tt_convert
from torchtune.models.gemma import gemma, lora_gemma
from torchtune.models.gemma2 import gemma2, lora_gemma2
from torchtune.models.gemma2 import _convert_weights as gemma2_convert
from torchtune.models.llama3 import llama3, lora_llama3
from torchtune.models.llama3_1 import llama3_1, lora_llama3_1
from torchtune.models.mistral import lora_mistral, mistral
from torchtune.models.phi3 import lora_phi3, phi3
from torchtune.models.phi3 import _convert_weights as phi3_convert
from torchtune.models.qwen2 import lora_qwen2, qwen2
from torchtune.models.qwen2 import _convert_weights as qwen2_convert
from torchtune.modules import TiedLinear, TransformerDecoder

from distillm_tune.models._registry import LoRASettings, ModelFamily, StateDict, register

Config = Dict[str, Any]


# ----------------------------------------------------------------------------- config.json -> args


def _refuse(family: str, key: str, value: Any, expected: str) -> ValueError:
    return ValueError(f"{family} config.json has {key}={value!r}; torchtune's {family} builder "
                      f"supports only {expected}")


def _rope(cfg: Config) -> Dict[str, Any]:
    """``rope_parameters`` (transformers 5) or ``rope_theta`` + ``rope_scaling`` (transformers 4),
    as one dict with ``rope_type`` and ``rope_theta``."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    if "type" in scaling:  # the oldest form: rope_scaling: {type: linear, factor: 2}
        scaling.setdefault("rope_type", scaling.pop("type"))
    params.update(scaling)  # a scaling entry, in whichever form, is never silently dropped
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    return params


def _head_dim(cfg: Config) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _common(family: str, cfg: Config, acts=("silu",)) -> Dict[str, Any]:
    """Arguments every torchtune decoder builder takes, from the config keys every HF decoder
    config has."""
    required = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                "vocab_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"{family} config.json lacks {missing}; expected all of {list(required)}")
    act_key = "hidden_activation" if cfg.get("hidden_activation") else "hidden_act"
    if cfg.get(act_key, acts[0]) not in acts:
        raise _refuse(family, act_key, cfg.get(act_key), f"{list(acts)}")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag, False):
            raise _refuse(family, flag, True, "False (the builder's projections have no bias)")
    heads = int(cfg["num_attention_heads"])
    return dict(
        vocab_size=int(cfg["vocab_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        embed_dim=int(cfg["hidden_size"]),
        intermediate_dim=int(cfg["intermediate_size"]),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_base=float(_rope(cfg)["rope_theta"]),
    )


def _plain_rope_and_head_dim(family: str, cfg: Config) -> None:
    """Refusals shared by the builders that use unscaled RoPE and ``head_dim = dim // heads``."""
    rope = _rope(cfg)
    if rope["rope_type"] != "default":
        raise _refuse(family, "rope_parameters.rope_type (rope_scaling.rope_type)",
                      rope["rope_type"], "unscaled RoPE ('default')")
    if _head_dim(cfg) * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise _refuse(family, "head_dim", cfg.get("head_dim"),
                      "head_dim == hidden_size // num_attention_heads")


def _llama_args(cfg: Config) -> Tuple[Callable, Callable, Dict[str, Any]]:
    args = _common("llama", cfg)
    rope = _rope(cfg)
    if rope["rope_type"] == "default":
        _plain_rope_and_head_dim("llama", cfg)
        return llama3, lora_llama3, args
    if rope["rope_type"] != "llama3":
        raise _refuse("llama", "rope_parameters.rope_type", rope["rope_type"], "'default' or 'llama3'")
    # Llama3ScaledRoPE as llama3_1's builder makes it fixes these three; only the factor varies.
    fixed = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    for key, value in fixed.items():
        if float(rope.get(key, value)) != value:
            raise _refuse("llama", f"rope_parameters.{key}", rope.get(key), f"{value}")
    _plain_rope_and_head_dim("llama", {**cfg, "rope_parameters": None, "rope_scaling": None})
    factor = float(rope.get("factor", 8.0))
    if factor != int(factor):
        raise _refuse("llama", "rope_parameters.factor", factor, "an integer factor")
    return llama3_1, lora_llama3_1, {**args, "scale_factor": int(factor)}


def _mistral_args(cfg: Config):
    args = _common("mistral", cfg)
    _plain_rope_and_head_dim("mistral", cfg)
    window = cfg.get("sliding_window")
    if window:
        # torchtune's Mistral attends to the whole sequence; up to the window that is exactly
        # sliding-window attention, so the model is built for sequences no longer than it.
        args["max_seq_len"] = min(args["max_seq_len"], int(window))
    return mistral, lora_mistral, args


def _qwen2_args(cfg: Config):
    args = _common("qwen2", cfg)
    _plain_rope_and_head_dim("qwen2", cfg)
    if cfg.get("use_sliding_window", False):
        raise _refuse("qwen2", "use_sliding_window", True, "False")
    return qwen2, lora_qwen2, {**args, "tie_word_embeddings": _tied(cfg)}


def _phi3_args(cfg: Config):
    args = _common("phi3", cfg)
    _plain_rope_and_head_dim("phi3", cfg)
    if float(cfg.get("partial_rotary_factor", 1.0)) != 1.0:
        raise _refuse("phi3", "partial_rotary_factor", cfg["partial_rotary_factor"], "1.0")
    if cfg.get("sliding_window") and int(cfg["sliding_window"]) < args["max_seq_len"]:
        args["max_seq_len"] = int(cfg["sliding_window"])  # same reasoning as Mistral's
    return phi3, lora_phi3, args


def _gemma_args(cfg: Config):
    args = _common("gemma", cfg, acts=("gelu_pytorch_tanh", "gelu_tanh"))
    if _rope(cfg)["rope_type"] != "default":
        raise _refuse("gemma", "rope_parameters.rope_type", _rope(cfg)["rope_type"], "'default'")
    if not _tied(cfg):
        raise _refuse("gemma", "tie_word_embeddings", False, "True (the output is the embedding)")
    return gemma, lora_gemma, {**args, "head_dim": _head_dim(cfg)}


def _gemma2_args(cfg: Config):
    builder, lora_builder, args = _gemma_args({**cfg, "model_type": "gemma"})
    layer_types = cfg.get("layer_types")
    expected = ["sliding_attention" if i % 2 == 0 else "full_attention"
                for i in range(args["num_layers"])]
    if layer_types is not None and list(layer_types) != expected:
        raise _refuse("gemma2", "layer_types", layer_types, "sliding window on even layers")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if cfg.get(key) is None:
            raise _refuse("gemma2", key, None, "a capping value (the builder always caps)")
    # torchtune's Gemma2Attention builds its sliding-window mask from the mask's shape, which is
    # right for a full forward but wrong for KV-cached decoding past the window: build the model
    # for sequences no longer than the window, where sliding and full attention agree.
    window = int(cfg.get("sliding_window") or 4096)
    args["max_seq_len"] = min(args["max_seq_len"], window)
    return gemma2, lora_gemma2, {
        **args,
        "hidden_capping_value": float(cfg["attn_logit_softcapping"]),
        "final_capping_value": float(cfg["final_logit_softcapping"]),
        "sliding_window_size": window,
        "query_pre_attn_scalar": cfg.get("query_pre_attn_scalar"),
    }


def _tied(cfg: Config) -> bool:
    return bool(cfg.get("tie_word_embeddings", False))


class SoftCappedTiedLinear(TiedLinear):
    """Gemma 2's head: ``cap * tanh(logits / cap)`` over the tied embedding
    (``final_logit_softcapping``). ``model_io.output_projection`` refuses it, since a fused loss
    that applies only the weight would skip the capping."""

    def __init__(self, tied_module: nn.Module, cap: float):
        super().__init__(tied_module)
        self.softcap = cap

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.softcap * torch.tanh(super().__call__(x) / self.softcap)


def _cap_logits_not_hidden(model: TransformerDecoder, cap: float) -> None:
    """torchtune 0.6.1's ``Gemma2FinalNorm`` applies ``final_capping_value`` to the normalised
    hidden state, where Gemma 2 (transformers, Google's reference) caps the logits: keep its
    RMSNorm (and its state-dict key), move the capping behind the head."""
    model.norm.logit_capping = nn.Identity()
    model.output = SoftCappedTiedLinear(model.tok_embeddings, cap)


def _gemma2_to_tune(sd, **dims):
    """torchtune 0.6.1's table maps ``pre_feedforward_layernorm`` to ``mlp_scale`` and
    ``post_feedforward_layernorm`` to ``mlp_norm``, the reverse of what its layer does with them
    (``mlp_norm`` runs before the MLP, ``mlp_scale`` on its output): swap after converting."""
    return _swap_mlp_norms(gemma2_convert.gemma2_hf_to_tune(sd, **dims))


def _gemma2_to_hf(sd, **dims):
    return gemma2_convert.gemma2_tune_to_hf(_swap_mlp_norms(sd), **dims)


def _swap_mlp_norms(sd: StateDict) -> StateDict:
    swap = {".mlp_norm.": ".mlp_scale.", ".mlp_scale.": ".mlp_norm."}
    out = {}
    for key, value in sd.items():
        for a, b in swap.items():
            if a in key:
                key = key.replace(a, b)
                break
        out[key] = value
    return out


# ----------------------------------------------------------------------------- weights


def _hub_key(key: str) -> str:
    """Bring any key form to the hub's ``model.layers...`` / ``lm_head.weight`` that torchtune's
    mapping tables know (a bare ``LlamaModel`` save has no ``model.`` prefix)."""
    return key if key.startswith(("model.", "lm_head.")) else "model." + key


def _dims(spec: "_Spec", cfg: Config) -> Dict[str, int]:
    args = spec.args(cfg)[2]
    dims = dict(num_heads=args["num_heads"], num_kv_heads=args["num_kv_heads"], dim=args["embed_dim"])
    if spec.takes_head_dim:
        dims["head_dim"] = _head_dim(cfg)
    return dims


def _checked(mapping: Dict[str, Optional[str]], keys, what: str) -> None:
    for key in keys:
        try:
            tt_convert.get_mapped_key(key, mapping)
        except Exception:
            raise ValueError(f"unexpected key {key!r} in {what}") from None


@dataclass(frozen=True)
class _Spec:
    name: str
    model_types: tuple
    # args(cfg) -> (builder, lora_builder, builder kwargs)
    args: Callable[[Config], Tuple[Callable, Callable, Dict[str, Any]]]
    # torchtune's converters and the HF -> torchtune key table they use
    hf_to_tune: Callable
    tune_to_hf: Callable
    from_hf: Dict[str, Optional[str]]
    # whether torchtune permutes q/k rows (interleaved RoPE) for this family: lora_b must follow
    permutes_qk: bool = True
    takes_head_dim: bool = True
    # the builder ties the output itself (no TiedLinear to add, no untied variant)
    builder_ties: bool = False

    # -- registry callables

    def build(self, cfg: Config, lora: Optional[LoRASettings] = None) -> TransformerDecoder:
        builder, lora_builder, args = self.args(cfg)
        if lora is None:
            model = builder(**args)
        else:
            if lora.apply_lora_to_output and (_tied(cfg) or self.builder_ties):
                raise ValueError(f"{self.name}: apply_lora_to_output=True cannot adapt a tied output "
                                 "layer (config.json tie_word_embeddings=True)")
            extra = {} if self.builder_ties else {"apply_lora_to_output": lora.apply_lora_to_output}
            model = lora_builder(
                lora_attn_modules=list(lora.lora_attn_modules), apply_lora_to_mlp=lora.apply_lora_to_mlp,
                lora_rank=lora.lora_rank, lora_alpha=lora.lora_alpha, lora_dropout=lora.lora_dropout,
                **extra, **args)
        if _tied(cfg) and not isinstance(model.output, TiedLinear):
            del model.output  # a registered submodule; TiedLinear is a plain object, not a Module
            model.output = TiedLinear(model.tok_embeddings)
        if self.name == "gemma2":
            _cap_logits_not_hidden(model, float(cfg["final_logit_softcapping"]))
        return model

    def to_tune(self, hf_sd: StateDict, cfg: Config) -> StateDict:
        tied = _tied(cfg) or self.builder_ties
        hub = {_hub_key(k): v for k, v in hf_sd.items()
               if "rotary_emb.inv_freq" not in k and not (tied and k == "lm_head.weight")}
        _checked(self.from_hf, hub, f"a {self.name} checkpoint")
        return self.hf_to_tune(hub, **_dims(self, cfg))

    def to_hf(self, tune_sd: StateDict, cfg: Config) -> StateDict:
        for key in tune_sd:
            if "lora_" in key or key.endswith(".magnitude"):
                raise ValueError(f"{key!r} is an adapter weight; merge LoRA before tune_to_hf")
        # The keys a model built from this config has (on meta: nothing allocated); Phi-3's
        # split q/k/v have no row of their own in torchtune's key table, so the table cannot say.
        with torch.device("meta"):
            expected = set(self.build(cfg).state_dict())
        unexpected = sorted(set(tune_sd) - expected)
        if unexpected:
            raise ValueError(f"unexpected keys {unexpected[:5]} in a torchtune {self.name} state dict "
                             f"for this config.json (expected keys like {sorted(expected)[:3]})")
        return self.tune_to_hf(dict(tune_sd), **_dims(self, cfg))

    def lora_to_peft(self, lora_sd: StateDict, cfg: Config, lora: LoRASettings):
        return _lora_to_peft(self, lora_sd, cfg, lora)

    def family(self) -> ModelFamily:
        return ModelFamily(name=self.name, model_types=self.model_types, build=self.build,
                           hf_to_tune=self.to_tune, tune_to_hf=self.to_hf,
                           load_tokenizer=_load_tokenizer, lora_to_peft=self.lora_to_peft)


def _load_tokenizer(checkpoint_dir: str, max_seq_len: Optional[int] = None):
    from distillm_tune.models.tokenizer import load_checkpoint_tokenizer

    return load_checkpoint_tokenizer(checkpoint_dir, max_seq_len)


# ----------------------------------------------------------------------------- PEFT export


def _permute_rows_to_hf(t: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """torchtune's interleaved RoPE row order -> HF's rotate-half order (what ``tune_to_hf`` does
    to a base q/k weight), for ``lora_b``'s ``rank`` columns."""
    cols = t.shape[-1]
    return t.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(n_heads * head_dim, cols)


def _fuse_lora(parts: List[Tuple[int, torch.Tensor, torch.Tensor]], rows: List[int]):
    """LoRA on some of the projections fused in one HF module (rows ``rows`` each, in order) is
    one LoRA on the fused module of rank ``n * r``: A stacked, each B in its own row/column block,
    zeros elsewhere. ``parts``: (slot, lora_a, lora_b) for the adapted projections."""
    rank = parts[0][1].shape[0]
    offsets = [sum(rows[:i]) for i in range(len(rows))]
    fused_b = parts[0][2].new_zeros(sum(rows), len(parts) * rank)
    for j, (slot, _, b) in enumerate(parts):
        fused_b[offsets[slot]:offsets[slot] + rows[slot], j * rank:(j + 1) * rank] = b
    return torch.cat([a for _, a, _ in parts], dim=0), fused_b


# Phi-3's fused HF modules and the torchtune projections they hold, in row order.
_PHI3_FUSED = {"self_attn.qkv_proj": ("attn.q_proj", "attn.k_proj", "attn.v_proj"),
               "mlp.gate_up_proj": ("mlp.w1", "mlp.w3")}


def _hf_module(spec: _Spec, module: str) -> Tuple[str, Optional[int]]:
    """torchtune module path -> (HF module path, slot inside a fused HF module or None)."""
    layer, _, inner = module.partition(".")[2].partition(".") if module.startswith("layers.") else (None, "", module)
    if spec.name == "phi3":
        for hf_inner, slots in _PHI3_FUSED.items():
            if inner in slots:
                return f"model.layers.{layer}.{hf_inner}", slots.index(inner)
    table = {v.rsplit(".", 1)[0]: k.rsplit(".", 1)[0] for k, v in spec.from_hf.items() if v}
    abstract = module if layer is None else f"layers.{{}}.{inner}"
    if abstract not in table:
        raise ValueError(f"no HF {spec.name} module corresponds to torchtune module {module!r}")
    return table[abstract].format(layer), None


def _lora_to_peft(spec: _Spec, lora_sd: StateDict, cfg: Config, lora: LoRASettings):
    """torchtune ``*.lora_a/b.weight`` -> PEFT ``base_model.model.<hf module>.lora_A/B.weight``,
    target modules and extra adapter-config entries (``rank_pattern``/``alpha_pattern`` for fused
    modules: rank ``n*r`` with alpha ``n*alpha`` keeps torchtune's ``alpha/r`` scaling)."""
    if any(k.endswith(".magnitude") for k in lora_sd):
        raise ValueError("DoRA magnitudes cannot be exported to a PEFT LoRA adapter")
    args = spec.args(cfg)[2]
    head_dim = args.get("head_dim") or args["embed_dim"] // args["num_heads"]
    groups: Dict[str, list] = {}  # HF module -> [(slot, lora_a, lora_b)]
    for key in sorted(k for k in lora_sd if k.endswith(".lora_a.weight")):
        module = key[: -len(".lora_a.weight")]
        a, b = lora_sd[key], lora_sd[f"{module}.lora_b.weight"]
        if spec.permutes_qk and module.endswith(("attn.q_proj", "attn.k_proj")):
            heads = args["num_heads"] if module.endswith("q_proj") else args["num_kv_heads"]
            b = _permute_rows_to_hf(b, heads, head_dim)
        hf_module, slot = _hf_module(spec, module)
        groups.setdefault(hf_module, []).append((slot, a, b))
    out, extra = {}, {}
    q, kv, ffn = args["num_heads"] * head_dim, args["num_kv_heads"] * head_dim, args["intermediate_dim"]
    for hf_module, parts in groups.items():
        a, b = parts[0][1:]
        if parts[0][0] is not None:  # Phi-3: rows of q, k, v or of gate, up
            a, b = _fuse_lora(parts, [q, kv, kv] if hf_module.endswith("qkv_proj") else [ffn, ffn])
            if len(parts) > 1:
                name = hf_module.split(".", 3)[3]
                extra.setdefault("rank_pattern", {})[name] = len(parts) * lora.lora_rank
                extra.setdefault("alpha_pattern", {})[name] = len(parts) * lora.lora_alpha
        out[f"base_model.model.{hf_module}.lora_A.weight"] = a.contiguous()
        out[f"base_model.model.{hf_module}.lora_B.weight"] = b.contiguous()
    return out, sorted({m.rsplit(".", 1)[-1] for m in groups}), extra


# ----------------------------------------------------------------------------- the families


def _phi3_to_tune(sd, num_heads, num_kv_heads, dim):
    return phi3_convert.phi3_hf_to_tune(sd, num_heads=num_heads, num_kv_heads=num_kv_heads, dim=dim)


def _phi3_to_hf(sd, **_dims):
    return phi3_convert.phi3_tune_to_hf(sd)


def _qwen2(fn):
    # torchtune's qwen2 converters drop/keep lm_head by this flag; the tied case is handled above
    return lambda sd, **dims: fn(sd, **dims, tie_word_embeddings=False)


_SPECS = (
    _Spec("llama", ("llama",), _llama_args, tt_convert.hf_to_tune, tt_convert.tune_to_hf,
          tt_convert._FROM_HF),
    _Spec("mistral", ("mistral",), _mistral_args, tt_convert.hf_to_tune, tt_convert.tune_to_hf,
          tt_convert._FROM_HF),
    _Spec("qwen2", ("qwen2",), _qwen2_args, _qwen2(qwen2_convert.qwen2_hf_to_tune),
          _qwen2(qwen2_convert.qwen2_tune_to_hf), qwen2_convert._FROM_HF, permutes_qk=False),
    _Spec("phi3", ("phi3",), _phi3_args, _phi3_to_tune, _phi3_to_hf, phi3_convert._PHI3_MINI,
          permutes_qk=False, takes_head_dim=False),
    _Spec("gemma", ("gemma",), _gemma_args, tt_convert.hf_to_tune, tt_convert.tune_to_hf,
          tt_convert._FROM_HF, builder_ties=True),
    _Spec("gemma2", ("gemma2",), _gemma2_args, _gemma2_to_tune, _gemma2_to_hf,
          gemma2_convert._GEMMA2_FROM_HF, builder_ties=True),
)

FAMILIES = {spec.name: register(spec.family()) for spec in _SPECS}
