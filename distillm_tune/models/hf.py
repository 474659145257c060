"""Hugging Face checkpoints in and out, for every registered model family.

A checkpoint directory is what ``save_pretrained`` writes: ``config.json`` plus weights
(``model.safetensors`` or ``pytorch_model.bin``, single or sharded with an index) and tokenizer
files. ``config.json``'s ``model_type`` selects the family (``_registry.family_for``); the family
builds the torchtune-component model and converts weights both ways. Nothing here knows one
architecture from another.

Loading builds the model on the meta device and assigns the converted tensors, so a 7B teacher
never exists twice in memory. Saving converts back to HF names (LoRA merged), writes into a
temporary sibling directory and renames it into place, so an interrupted save never leaves a
half-written checkpoint where a good one was.
"""

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch
from huggingface_hub import save_torch_state_dict
from safetensors.torch import load_file as load_safetensors
from safetensors.torch import save_file as save_safetensors
from torch import nn
from torchtune.modules.peft import LoRALinear, get_adapter_params, get_merged_lora_ckpt
from torchtune.training import set_default_dtype

from distillm_tune.models._registry import LoRASettings, ModelFamily, StateDict, family_for

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_WEIGHTS = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
# Looked for in this order: the first that exists is the checkpoint's weights.
WEIGHT_FILES = (SAFE_INDEX, SAFE_WEIGHTS, BIN_INDEX, BIN_WEIGHTS)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
)
COPIED_FILES = ("generation_config.json", "chat_template.jinja") + TOKENIZER_FILES
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SUBDIR = "adapter"
DEFAULT_MAX_SHARD_SIZE = "5GB"


# ----------------------------------------------------------------------------- reading


def read_hf_config(checkpoint_dir: PathLike) -> Dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    if not os.path.isdir(checkpoint_dir):
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir!r} does not exist")
    path = os.path.join(checkpoint_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in checkpoint directory {checkpoint_dir!r}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start}): expected an HF config.json") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}; expected an object (HF config.json)")
    return config


def _family(config: Dict[str, Any], where: str) -> ModelFamily:
    if "model_type" not in config:
        raise ValueError(f"{where} has no 'model_type'; cannot tell which model family it is")
    return family_for(config["model_type"])


def _weight_files(checkpoint_dir: str) -> List[str]:
    """Paths of the weight files, in the order to read them; errors name what is missing."""
    for name in WEIGHT_FILES:
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return [path]
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        for shard in shards:
            if not os.path.isfile(os.path.join(checkpoint_dir, shard)):
                raise FileNotFoundError(
                    f"shard {shard!r} listed in {path} is missing from {checkpoint_dir!r}"
                )
        return [os.path.join(checkpoint_dir, s) for s in shards]
    raise FileNotFoundError(
        f"no weight files in {checkpoint_dir!r}; looked for {', '.join(WEIGHT_FILES)}"
    )


def _load_weight_file(path: str) -> StateDict:
    try:
        if path.endswith(".safetensors"):
            return load_safetensors(path, device="cpu")
        try:  # mmap: shards are not copied into memory twice
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files from torch < 1.6 (legacy format) cannot be mmapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file fails in many ways
        raise ValueError(
            f"cannot read weight file {path!r} ({os.path.getsize(path)} bytes): {type(e).__name__}: {e}"
        ) from e


def _read_with_sources(checkpoint_dir: PathLike) -> Tuple[StateDict, Dict[str, str]]:
    """All weights of a checkpoint, and for each key the file it came from (for error messages)."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    read_hf_config(checkpoint_dir)  # same missing-directory / missing-config errors first
    state_dict, sources = {}, {}
    for path in _weight_files(checkpoint_dir):
        part = _load_weight_file(path)
        state_dict.update(part)
        sources.update({key: path for key in part})
    return state_dict, sources


def read_hf_state_dict(checkpoint_dir: PathLike) -> StateDict:
    """The HF-named state dict of a checkpoint (single file or all shards merged), on CPU."""
    return _read_with_sources(checkpoint_dir)[0]


# ----------------------------------------------------------------------------- building / loading


def build_hf_model(
    checkpoint_dir_or_config: Union[PathLike, Dict[str, Any]],
    lora: Optional[LoRASettings] = None,
) -> nn.Module:
    """The family's torchtune model for a checkpoint directory or a config dict; no weights loaded
    (call it under ``torch.device("meta")`` to allocate nothing)."""
    if isinstance(checkpoint_dir_or_config, dict):
        config, where = checkpoint_dir_or_config, "the config"
    else:
        config = read_hf_config(checkpoint_dir_or_config)
        where = os.path.join(os.fspath(checkpoint_dir_or_config), CONFIG_FILE)
    return _family(config, where).build(config, lora)


def _build_on_meta(family: ModelFamily, config: Dict[str, Any], lora, dtype, where: str = CONFIG_FILE) -> nn.Module:
    with set_default_dtype(dtype), torch.device("meta"):
        try:
            return family.build(config, lora)
        except KeyError as e:
            raise ValueError(f"{where} has no {e.args[0]!r}, which a {family.name} checkpoint needs") from None


def _suffix_index(keys) -> Dict[str, Optional[str]]:
    """Every dotted suffix (two parts or more) of every key -> the key, or None if ambiguous.

    Checkpoints of one architecture come with different prefixes (``transformer.``, ``model.``,
    none); matching on suffixes lets the shape check pair them without family knowledge."""
    index: Dict[str, Optional[str]] = {}
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts) - 1):
            suffix = ".".join(parts[i:])
            index[suffix] = key if index.get(suffix, key) == key else None
    return index


def _match_key(key: str, expected: Dict[str, torch.Tensor], index) -> Optional[str]:
    if key in expected:
        return key
    parts = key.split(".")
    for i in range(len(parts) - 1):
        found = index.get(".".join(parts[i:]))
        if found is not None:
            return found
    return None


def _expected_hf_shapes(family: ModelFamily, config: Dict[str, Any],
                        base_model: nn.Module) -> Optional[StateDict]:
    """HF-named meta tensors the config implies (the family's ``tune_to_hf`` of a meta model).
    None when a family's converter cannot run on meta tensors: the check is then skipped and the
    converter / strict load report the problem instead."""
    try:
        return family.tune_to_hf(base_model.state_dict(), config)
    except Exception:
        return None


def _check_hf_shapes(family, config, base_model: nn.Module, hf_sd: StateDict,
                     sources: Dict[str, str], config_path: str):
    """Before conversion (which would fail with an opaque ``view`` error), compare every weight's
    shape with what ``config.json`` implies."""
    expected = _expected_hf_shapes(family, config, base_model)
    if expected is None:
        return
    index = _suffix_index(expected)
    for key, tensor in hf_sd.items():
        match = _match_key(key, expected, index)
        if match is not None and tuple(tensor.shape) != tuple(expected[match].shape):
            raise ValueError(
                f"{sources[key]}: weight {key!r} has shape {tuple(tensor.shape)}, but "
                f"{config_path} implies {tuple(expected[match].shape)}"
            )


def _check_tune_keys(model: nn.Module, tune_sd: StateDict, checkpoint_dir: str):
    """Strict-load check, done before touching the model: every base weight present with the
    model's shape, nothing extra. Only adapter (LoRA) parameters may be absent."""
    model_sd = model.state_dict()
    adapter = set(get_adapter_params(model))
    missing = sorted(k for k in model_sd if k not in tune_sd and k not in adapter)
    unexpected = sorted(k for k in tune_sd if k not in model_sd)
    if missing or unexpected:
        raise ValueError(
            f"weights of {checkpoint_dir!r} do not fit the model its config describes: "
            f"missing {missing}, unexpected {unexpected}"
        )
    for key, tensor in tune_sd.items():
        if tuple(tensor.shape) != tuple(model_sd[key].shape):
            raise ValueError(
                f"weight {key!r} of {checkpoint_dir!r} has shape {tuple(tensor.shape)} after "
                f"conversion; the model built from its config expects {tuple(model_sd[key].shape)}"
            )


def _has_meta_tensors(model: nn.Module) -> bool:
    return any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))


def _init_leftovers(model: nn.Module) -> None:
    """After assigning checkpoint tensors, give the tensors that are not in a checkpoint real
    storage: RoPE caches (non-persistent buffers) and LoRA adapters (lora_b = 0, so the model
    starts equal to the base model)."""
    for module in model.modules():
        if hasattr(module, "rope_init"):
            module.rope_init()
        # LoRALinear.to_empty only touches lora_a / lora_b, never the loaded base weight.
        if isinstance(module, LoRALinear) and module.lora_a.weight.is_meta:
            module.to_empty(device="cpu")
            module.initialize_parameters()


def _materialise(model: nn.Module, family, config, lora, dtype, tune_sd: StateDict) -> nn.Module:
    """Assign the weights to the meta-built ``model`` (no second copy of them). Falls back to a
    regular CPU build when a family's module keeps some other non-persistent buffer this code
    cannot re-create."""
    model.load_state_dict(tune_sd, strict=False, assign=True)
    _init_leftovers(model)
    if not _has_meta_tensors(model):
        return model
    with set_default_dtype(dtype):
        model = family.build(config, lora)
    model.load_state_dict(tune_sd, strict=False)
    return model


def load_hf(
    checkpoint_dir: PathLike,
    dtype: torch.dtype = torch.float32,
    lora: Optional[LoRASettings] = None,
) -> nn.Module:
    """The family's torchtune model with the checkpoint's weights loaded strictly, in ``dtype``.

    With ``lora``, adapters are freshly initialised (lora_b = 0), so outputs equal the base
    model's. The model is on CPU in training mode, like a torchtune builder's output.
    """
    checkpoint_dir = os.fspath(checkpoint_dir)
    config = read_hf_config(checkpoint_dir)
    config_path = os.path.join(checkpoint_dir, CONFIG_FILE)
    family = _family(config, config_path)
    # Meta builds first: a config the family cannot express fails before any weight is read.
    base_model = _build_on_meta(family, config, None, dtype, config_path)
    target_model = _build_on_meta(family, config, lora, dtype, config_path)
    hf_sd, sources = _read_with_sources(checkpoint_dir)
    _check_finite(hf_sd, sources, checkpoint_dir)
    _check_hf_shapes(family, config, base_model, hf_sd, sources, config_path)
    tune_sd = {
        k: (v.to(dtype) if v.is_floating_point() else v)
        for k, v in family.hf_to_tune(hf_sd, config).items()
    }
    del hf_sd
    _check_tune_keys(target_model, tune_sd, checkpoint_dir)
    return _materialise(target_model, family, config, lora, dtype, tune_sd)


def _check_finite(hf_sd: Dict[str, torch.Tensor], sources: Dict[str, str], checkpoint_dir: str) -> None:
    """A damaged checkpoint with NaN/inf weights would train on NaN losses, or generate and score
    garbage without an error: refused, naming the first such tensor and its file."""
    bad = [k for k, v in hf_sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{checkpoint_dir!r} holds non-finite weights in {len(bad)} tensors (first: {bad[0]} in "
                         f"{os.path.basename(sources.get(bad[0], '?'))}); the checkpoint is damaged")


def load_hf_tokenizer(checkpoint_dir: PathLike, max_seq_len: Optional[int] = None):
    """The family's tokenizer for a checkpoint directory (ids equal to the HF tokenizer's)."""
    checkpoint_dir = os.fspath(checkpoint_dir)
    config = read_hf_config(checkpoint_dir)
    family = _family(config, os.path.join(checkpoint_dir, CONFIG_FILE))
    if family.load_tokenizer is None:
        raise NotImplementedError(f"model family {family.name!r} provides no tokenizer loader")
    return family.load_tokenizer(checkpoint_dir, max_seq_len)


# ----------------------------------------------------------------------------- writing helpers


@contextlib.contextmanager
def _atomic_dir(output_dir: PathLike) -> Iterator[str]:
    """Yield a temporary sibling directory; on success it replaces ``output_dir``, on any error it
    is deleted and ``output_dir`` (if it existed) is untouched."""
    output_dir = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"output_dir {output_dir!r} exists and is not a directory")
    parent, base = os.path.split(output_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        _swap_in(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: str, output_dir: str) -> None:
    """Rename ``tmp`` to ``output_dir``; an existing ``output_dir`` is moved aside first and only
    deleted once the new one is in place (restored if the rename fails)."""
    if not os.path.exists(output_dir):
        os.rename(tmp, output_dir)
        return
    parent, base = os.path.split(output_dir)
    old = tempfile.mkdtemp(prefix=f".{base}.old-", dir=parent)
    os.rmdir(old)
    os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)
    except BaseException:
        os.rename(old, output_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _for_safetensors(state_dict: StateDict, dtype: Optional[torch.dtype]) -> StateDict:
    """CPU, contiguous, optionally cast floats, and no two entries sharing storage (safetensors
    refuses shared tensors, e.g. tied weights), nor a tensor covering only part of its storage
    (FSDP2's gathered full tensors of an odd row count, e.g. GPT-2's 50257-row embedding on 2
    ranks, are views of the padded all-gather buffer)."""
    out, seen = {}, set()
    for key, t in state_dict.items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


def _write_weights(state_dict: StateDict, out_dir: str, max_shard_size) -> None:
    """``model.safetensors``, or shards plus ``model.safetensors.index.json`` past
    ``max_shard_size`` ("5GB", "20KB" or bytes), written by huggingface_hub as transformers does."""
    save_torch_state_dict(state_dict, out_dir, max_shard_size=max_shard_size, metadata={"format": "pt"})


def _float_dtype_name(state_dict: StateDict) -> Optional[str]:
    for t in state_dict.values():
        if t.is_floating_point():
            return str(t.dtype).replace("torch.", "")
    return None


def _write_config(config: Dict[str, Any], out_dir: str, hf_sd: StateDict) -> None:
    """Source ``config.json`` with its dtype fields telling the dtype actually written (HF loads
    with ``dtype="auto"`` from them)."""
    config = dict(config)
    name = _float_dtype_name(hf_sd)
    if name is not None:
        config["torch_dtype"] = name
        if "dtype" in config:
            config["dtype"] = name
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _copy_side_files(source_dir: str, out_dir: str) -> None:
    for name in COPIED_FILES:
        path = os.path.join(source_dir, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(out_dir, name))


# ----------------------------------------------------------------------------- LoRA helpers


def _lora_rank_alpha(model: nn.Module) -> Optional[Tuple[int, float]]:
    """(rank, alpha) shared by the model's adapter modules; None without adapters."""
    found = {
        (m.rank, m.alpha) for m in model.modules()
        if callable(getattr(m, "adapter_params", None)) and hasattr(m, "rank")
    }
    if len(found) > 1:
        raise ValueError(f"adapters with different (rank, alpha) {sorted(found)} cannot be merged")
    return found.pop() if found else None


def _is_adapter_key(key: str) -> bool:
    return ".lora_a." in key or ".lora_b." in key or key.endswith(".magnitude")


def merge_lora_state_dict(tune_sd: StateDict, rank: int, alpha: float) -> StateDict:
    """``tune_sd`` with LoRA merged into the base weights (in float32, cast back to the base
    weight's dtype). The input and the tensors it shares with a live model are not modified."""
    modules = {k.rsplit(".lora_a.", 1)[0] for k in tune_sd if ".lora_a." in k}
    merged = {k: v for k, v in tune_sd.items() if not _is_adapter_key(k)}
    for module in modules:
        part = {k: v.detach().float().clone() for k, v in tune_sd.items()
                if k.startswith(module + ".") and k[len(module) + 1:] in
                ("weight", "lora_a.weight", "lora_b.weight", "magnitude")}
        base_dtype = tune_sd[f"{module}.weight"].dtype
        part = get_merged_lora_ckpt(part, rank=rank, alpha=alpha)
        merged[f"{module}.weight"] = part[f"{module}.weight"].to(base_dtype)
    return merged


# ----------------------------------------------------------------------------- saving


def _write_full_checkpoint(tune_sd: StateDict, out_dir: str, source_dir: str, dtype,
                           max_shard_size, lora_rank_alpha) -> None:
    config = read_hf_config(source_dir)
    family = _family(config, os.path.join(source_dir, CONFIG_FILE))
    if any(_is_adapter_key(k) for k in tune_sd):
        if lora_rank_alpha is None:
            raise ValueError("state dict has LoRA weights but no (rank, alpha) to merge them with")
        tune_sd = merge_lora_state_dict(tune_sd, *lora_rank_alpha)
    hf_sd = _for_safetensors(family.tune_to_hf(tune_sd, config), dtype)
    _write_weights(hf_sd, out_dir, max_shard_size)
    _write_config(config, out_dir, hf_sd)
    _copy_side_files(source_dir, out_dir)


def save_hf_state_dict(
    tune_sd: StateDict,
    output_dir: PathLike,
    source_dir: PathLike,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    lora_rank_alpha: Optional[Tuple[int, float]] = None,
) -> None:
    """:func:`save_hf` for a full (gathered) torchtune state dict, e.g. from an FSDP model."""
    source_dir = os.fspath(source_dir)
    with _atomic_dir(output_dir) as tmp:
        _write_full_checkpoint(tune_sd, tmp, source_dir, dtype, max_shard_size, lora_rank_alpha)


def save_hf(
    model: nn.Module,
    output_dir: PathLike,
    source_dir: PathLike,
    dtype: Optional[torch.dtype] = None,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
) -> None:
    """Write ``model`` as an HF checkpoint that ``AutoModel*.from_pretrained`` loads: merged full
    weights (``dtype`` or the model's), ``source_dir``'s config, generation config and tokenizer
    files. Atomic: ``output_dir`` is replaced only once everything is written."""
    state_dict = {k: v.detach() for k, v in model.state_dict().items()}
    save_hf_state_dict(state_dict, output_dir, source_dir, dtype, max_shard_size,
                       _lora_rank_alpha(model))


def _write_adapter(lora_sd: StateDict, out_dir: str, source_dir: str, lora: LoRASettings) -> None:
    config = read_hf_config(source_dir)
    family = _family(config, os.path.join(source_dir, CONFIG_FILE))
    if family.lora_to_peft is None:
        raise NotImplementedError(f"model family {family.name!r} does not support PEFT export")
    if not lora_sd:
        raise ValueError("the model has no LoRA weights to export")
    result = family.lora_to_peft(lora_sd, config, lora)
    peft_sd, target_modules = result[0], result[1]
    extra = result[2] if len(result) > 2 else {}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_2_SEQ_LM" if family.is_encoder_decoder else "CAUSAL_LM",
        "r": lora.lora_rank,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "target_modules": sorted(target_modules),
        "base_model_name_or_path": source_dir,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_dora": False,
        "use_rslora": False,
        **extra,
    }
    save_safetensors(_for_safetensors(peft_sd, None), os.path.join(out_dir, ADAPTER_WEIGHTS),
                     metadata={"format": "pt"})
    with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)


def save_peft_adapter(
    model: nn.Module, output_dir: PathLike, source_dir: PathLike, lora: LoRASettings
) -> None:
    """Write the model's LoRA weights as a PEFT adapter (``adapter_model.safetensors`` +
    ``adapter_config.json``) for ``peft.PeftModel.from_pretrained`` on the HF base model."""
    lora_sd = {k: v.detach() for k, v in model.state_dict().items() if _is_adapter_key(k)}
    save_peft_adapter_state_dict(lora_sd, output_dir, source_dir, lora)


def save_peft_adapter_state_dict(
    lora_sd: StateDict, output_dir: PathLike, source_dir: PathLike, lora: LoRASettings
) -> None:
    """:func:`save_peft_adapter` for a (gathered) state dict of LoRA weights, e.g. from FSDP."""
    with _atomic_dir(output_dir) as tmp:
        _write_adapter(lora_sd, tmp, os.fspath(source_dir), lora)


# ----------------------------------------------------------------------------- checkpointer


class HFCheckpointer:
    """torchtune-style checkpointer over HF checkpoints of any registered family.

    ``load_checkpoint()`` -> ``{"model": torchtune state dict}`` (checkpoint dtype);
    ``save_checkpoint(state_dict, epoch, ...)`` writes ``output_dir/epoch_{epoch}/`` atomically:
    the merged HF checkpoint (unless ``adapter_only``), the PEFT adapter in ``adapter/`` when LoRA
    is configured, and for ``intermediate_checkpoint`` every other entry of ``state_dict``
    (optimizer, seed, ...) as ``recipe_state.pt``. The adapter gets its own folder because
    transformers' ``from_pretrained`` treats any folder holding ``adapter_config.json`` as a PEFT
    adapter and would load the base model named in it instead of the merged weights next to it.
    """

    def __init__(self, checkpoint_dir: PathLike, output_dir: PathLike,
                 lora: Optional[Dict[str, Any]] = None):
        self.checkpoint_dir = os.fspath(checkpoint_dir)
        self.output_dir = os.fspath(output_dir)
        self.lora = None if lora is None else _lora_settings(lora)
        self.config = read_hf_config(self.checkpoint_dir)
        self.family = _family(self.config, os.path.join(self.checkpoint_dir, CONFIG_FILE))

    def load_checkpoint(self) -> Dict[str, Any]:
        hf_sd = read_hf_state_dict(self.checkpoint_dir)
        return {"model": self.family.hf_to_tune(hf_sd, self.config)}

    def save_checkpoint(self, state_dict: Dict[str, Any], epoch: int,
                        intermediate_checkpoint: bool = False, adapter_only: bool = False) -> str:
        """Returns the epoch directory written."""
        model_sd = state_dict["model"]
        adapter_sd = state_dict.get("adapter") or {
            k: v for k, v in model_sd.items() if _is_adapter_key(k)}
        if adapter_only and (self.lora is None or not adapter_sd):
            raise ValueError("adapter_only=True needs a LoRA configuration and LoRA weights")
        epoch_dir = os.path.join(self.output_dir, f"epoch_{epoch}")
        rank_alpha = None if self.lora is None else (self.lora.lora_rank, self.lora.lora_alpha)
        with _atomic_dir(epoch_dir) as tmp:
            if not adapter_only:
                _write_full_checkpoint(model_sd, tmp, self.checkpoint_dir, None,
                                       DEFAULT_MAX_SHARD_SIZE, rank_alpha)
            if self.lora is not None and adapter_sd:
                adapter_dir = os.path.join(tmp, ADAPTER_SUBDIR)
                os.mkdir(adapter_dir)
                _write_adapter(adapter_sd, adapter_dir, self.checkpoint_dir, self.lora)
            if intermediate_checkpoint:
                rest = {k: v for k, v in state_dict.items() if k not in ("model", "adapter")}
                torch.save(rest, os.path.join(tmp, "recipe_state.pt"))
        return epoch_dir


def _lora_settings(lora: Union[LoRASettings, Dict[str, Any]]) -> LoRASettings:
    if isinstance(lora, LoRASettings):
        return lora
    lora = dict(lora)
    if "lora_attn_modules" in lora:
        lora["lora_attn_modules"] = tuple(lora["lora_attn_modules"])
    return LoRASettings(**lora)
