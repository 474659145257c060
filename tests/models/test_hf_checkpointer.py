"""The HF checkpoint layer (models/hf.py) exercised through the Llama family: every weight-file
layout, strict loading, export back to transformers (merged LoRA and PEFT adapters), the error
messages and atomic saving. Tiny random models, offline."""

import hashlib
import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM

from distillm_tune.models import LoRASettings, hf
from distillm_tune.models.hf import (
    HFCheckpointer,
    build_hf_model,
    load_hf,
    read_hf_config,
    read_hf_state_dict,
    save_hf,
    save_peft_adapter,
)
try:  # tests/ without __init__.py: pytest puts this folder on sys.path
    from test_llama import (
        _train_sentencepiece, hf_logits, left_padded_batch, make_hf_llama, tiny_llama_config,
        tune_mask,
    )
except ImportError:  # tests/ as a package
    from tests.models.test_llama import (
        _train_sentencepiece, hf_logits, left_padded_batch, make_hf_llama, tiny_llama_config,
        tune_mask,
    )

ATOL = 1e-5
ALL_LORA = LoRASettings(
    lora_attn_modules=("q_proj", "k_proj", "v_proj", "output_proj"),
    apply_lora_to_mlp=True, apply_lora_to_output=True, lora_rank=4, lora_alpha=8.0,
)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A GQA tiny Llama saved with save_pretrained (safetensors) plus tokenizer files."""
    path = tmp_path_factory.mktemp("source")
    model = make_hf_llama(path, tiny_llama_config(num_kv_heads=2))
    _train_sentencepiece(path / "tokenizer.model")
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    return path, model


@pytest.fixture(scope="module")
def batch():
    return left_padded_batch()


def tune_logits(model, batch):
    tokens, real, positions = batch
    with torch.no_grad():
        return model.eval()(tokens, mask=tune_mask(real), input_pos=positions)


def max_diff(a, b, batch):
    return (a - b)[batch[1]].abs().max().item()


def copy_checkpoint(src, dst, weights=True):
    dst.mkdir()
    for name in os.listdir(src):
        if weights or not (name.endswith(".safetensors") or name.endswith(".index.json")):
            shutil.copy(src / name, dst / name)
    return dst


def dir_digest(path):
    return {n: hashlib.sha256((path / n).read_bytes()).hexdigest()
            for n in sorted(os.listdir(path))}


# ----------------------------------------------------------------------------- loading


def _layout(kind, src, dst, hf_model):
    """Write ``kind`` of checkpoint into ``dst``."""
    if kind == "safetensors":
        return copy_checkpoint(src, dst)
    if kind == "sharded_safetensors":
        hf_model.save_pretrained(dst, max_shard_size="20KB")
        return dst
    copy_checkpoint(src, dst, weights=False)
    sd = hf_model.state_dict()
    if kind == "bin":
        torch.save(sd, dst / "pytorch_model.bin")
    else:  # sharded bin with an index, as transformers 4 wrote it
        keys = list(sd)
        shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
                  "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
        for name, ks in shards.items():
            torch.save({k: sd[k] for k in ks}, dst / name)
        index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
        (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return dst


@pytest.mark.parametrize("kind", ["safetensors", "sharded_safetensors", "bin", "sharded_bin"])
def test_load_every_layout(kind, source, batch, tmp_path):
    src, hf_model = source
    path = _layout(kind, src, tmp_path / kind, hf_model)
    if kind == "sharded_safetensors":
        assert len([n for n in os.listdir(path) if n.endswith(".safetensors")]) > 1
    sd = read_hf_state_dict(path)
    ref_sd = hf_model.state_dict()
    assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    diff = max_diff(tune_logits(load_hf(path), batch), hf_logits(hf_model, *batch), batch)
    print(f"{kind}: max |logit diff| vs transformers {diff:.2e}")
    assert diff < ATOL


def test_build_on_meta_and_dtype(source):
    src, _ = source
    with torch.device("meta"):
        model = build_hf_model(src)
        lora_model = build_hf_model(read_hf_config(src), lora=ALL_LORA)
    assert all(p.is_meta for p in model.parameters())
    assert any("lora_a" in k for k in lora_model.state_dict())
    bf16 = load_hf(src, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert not any(t.is_meta for t in list(bf16.parameters()) + list(bf16.buffers()))
    assert all(p.requires_grad for p in bf16.parameters())


def test_lora_load_starts_at_base(source, batch):
    src, hf_model = source
    model = load_hf(src, lora=ALL_LORA)
    lora_b = [m.lora_b.weight for m in model.modules() if hasattr(m, "lora_b")]
    assert len(lora_b) == 2 * 7 + 1 and all(torch.count_nonzero(b) == 0 for b in lora_b)
    assert all(torch.count_nonzero(m.lora_a.weight) > 0
               for m in model.modules() if hasattr(m, "lora_a"))
    assert max_diff(tune_logits(model, batch), hf_logits(hf_model, *batch), batch) < ATOL


# ----------------------------------------------------------------------------- saving


def test_save_hf_round_trip(source, batch, tmp_path):
    src, hf_model = source
    out = tmp_path / "export"
    save_hf(load_hf(src), out, src)
    for name in ("config.json", "generation_config.json", "tokenizer.model",
                 "tokenizer_config.json", "model.safetensors"):
        assert (out / name).is_file(), name
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = hf_model.state_dict()
    assert all(torch.equal(reloaded.state_dict()[k], ref[k]) for k in ref)
    diff = max_diff(hf_logits(reloaded, *batch), hf_logits(hf_model, *batch), batch)
    print(f"save_hf -> from_pretrained: max |logit diff| {diff:.2e}")
    assert diff == 0.0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temp dirs left


def test_save_hf_sharded_and_dtype(source, batch, tmp_path):
    src, hf_model = source
    out = tmp_path / "sharded"
    save_hf(load_hf(src), out, src, dtype=torch.bfloat16, max_shard_size="20KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ours = load_hf(out)  # our loader reads what we wrote
    diff = max_diff(tune_logits(ours, batch), hf_logits(reloaded, *batch), batch)
    print(f"bf16 sharded export, ours vs transformers on it: {diff:.2e}")
    assert diff < ATOL


def _random_lora(model, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_b"):
                m.lora_b.weight.normal_(0, 0.05)
                m.lora_a.weight.normal_(0, 0.2)
    return model


def test_merged_lora_export_equals_lora_model(source, batch, tmp_path):
    src, _ = source
    model = _random_lora(load_hf(src, lora=ALL_LORA))
    lora_logits = tune_logits(model, batch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    save_hf(model, tmp_path / "merged", src)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # merge did not touch the model
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    diff = max_diff(hf_logits(reloaded, *batch), lora_logits, batch)
    base_gap = max_diff(hf_logits(source[1], *batch), lora_logits, batch)
    print(f"merged LoRA export vs LoRA model: {diff:.2e} (LoRA moved logits by {base_gap:.2e})")
    assert base_gap > 1e-2 and diff < ATOL


@pytest.mark.usefixtures("peft_without_torchao")
def test_peft_adapter_equals_lora_model(source, batch, tmp_path):
    from peft import PeftModel

    src, _ = source
    base_dir = tmp_path / "base"
    save_hf(load_hf(src), base_dir, src)
    model = _random_lora(load_hf(src, lora=ALL_LORA))
    lora_logits = tune_logits(model, batch)
    save_peft_adapter(model, tmp_path / "adapter", base_dir, ALL_LORA)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM"
    assert (cfg["r"], cfg["lora_alpha"]) == (4, 8.0)
    assert cfg["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter").eval()
    diff = max_diff(hf_logits(peft_model, *batch), lora_logits, batch)
    print(f"PEFT adapter on exported base vs LoRA model: {diff:.2e}")
    assert diff < ATOL


def test_checkpointer(source, batch, tmp_path):
    src, _ = source
    lora = dict(lora_attn_modules=["q_proj", "k_proj"], apply_lora_to_mlp=False,
                apply_lora_to_output=False, lora_rank=4, lora_alpha=8.0)
    ckpt = HFCheckpointer(src, tmp_path / "out", lora=lora)
    model = hf.build_hf_model(src, lora=ckpt.lora)
    missing, unexpected = model.load_state_dict(ckpt.load_checkpoint()["model"], strict=False)
    assert not unexpected and all("lora_" in k for k in missing)
    _random_lora(model)
    lora_logits = tune_logits(model, batch)
    state = {"model": model.state_dict(), "optimizer": {"step": 7}}
    epoch_dir = ckpt.save_checkpoint(state, epoch=0, intermediate_checkpoint=True)
    assert {"model.safetensors", "config.json", "recipe_state.pt", "adapter"} <= set(
        os.listdir(epoch_dir))
    assert set(os.listdir(os.path.join(epoch_dir, "adapter"))) == {
        "adapter_model.safetensors", "adapter_config.json"}
    assert torch.load(os.path.join(epoch_dir, "recipe_state.pt"))["optimizer"] == {"step": 7}
    reloaded = AutoModelForCausalLM.from_pretrained(epoch_dir).eval()
    assert max_diff(hf_logits(reloaded, *batch), lora_logits, batch) < ATOL
    only = ckpt.save_checkpoint(state, epoch=1, adapter_only=True)
    assert os.listdir(only) == ["adapter"]


def test_interrupted_save_keeps_previous_checkpoint(source, tmp_path, monkeypatch):
    src, _ = source
    out = tmp_path / "out"
    model = load_hf(src)
    save_hf(model, out, src, max_shard_size="20KB")
    digest = dir_digest(out)
    real_save, calls = safetensors.torch.save_file, []

    def failing_save(*args, **kwargs):  # write some shards, then die mid-checkpoint
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full (simulated)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)  # what huggingface_hub calls
    with torch.no_grad():
        model.tok_embeddings.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="simulated"):
        save_hf(model, out, src, max_shard_size="20KB")
    assert dir_digest(out) == digest
    assert os.listdir(tmp_path) == ["out"]  # temporary directory cleaned up
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    save_hf(model, out, src)  # a completed save does replace it
    assert dir_digest(out) != digest and os.listdir(tmp_path) == ["out"]


# ----------------------------------------------------------------------------- errors


def test_error_missing_directory_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf(tmp_path / "empty")


def test_error_no_weight_files(source, tmp_path):
    path = copy_checkpoint(source[0], tmp_path / "noweights", weights=False)
    with pytest.raises(FileNotFoundError) as e:
        load_hf(path)
    msg = str(e.value)
    assert str(path) in msg and "model.safetensors" in msg and "pytorch_model.bin" in msg


def test_error_missing_shard(source, tmp_path):
    path = tmp_path / "sharded"
    source[1].save_pretrained(path, max_shard_size="20KB")
    (path / "model-00002-of-00014.safetensors").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_hf(path)
    assert "model-00002-of-00014.safetensors" in str(e.value)
    assert "model.safetensors.index.json" in str(e.value)


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_error_unknown_model_type(source, tmp_path):
    path = copy_checkpoint(source[0], tmp_path / "badtype")
    _edit_config(path, model_type="llamazilla")
    with pytest.raises(ValueError) as e:
        load_hf(path)
    assert "llamazilla" in str(e.value) and "'llama'" in str(e.value)


def test_error_shape_mismatch(source, tmp_path):
    path = copy_checkpoint(source[0], tmp_path / "badshape")
    _edit_config(path, hidden_size=48, head_dim=12)
    with pytest.raises(ValueError) as e:
        load_hf(path)
    msg = str(e.value)
    print(f"shape error: {msg}")
    assert "model.safetensors" in msg and "(131, 64)" in msg and "(131, 48)" in msg
    assert "model.embed_tokens.weight" in msg or "lm_head.weight" in msg


def test_fallback_when_a_module_has_other_buffers(source, batch, tmp_path):
    """A family module with a non-persistent buffer that is neither a RoPE cache nor LoRA (as
    other families may have) cannot be re-created after a meta build: load_hf must fall back to
    a regular build and still load every weight."""
    from torch import nn

    from distillm_tune.models import ModelFamily, family_for, register

    class WithBuffer(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.register_buffer("scale", torch.ones(()), persistent=False)

        def forward(self, tokens, **kwargs):
            return self.inner(tokens, **kwargs) * self.scale

    llama = family_for("llama")
    prefixed = lambda sd: {f"inner.{k}": v for k, v in sd.items()}  # noqa: E731
    register(ModelFamily(
        name="test_buffered_llama", model_types=("test_buffered_llama",),
        build=lambda cfg, lora: WithBuffer(llama.build(cfg, lora)),
        hf_to_tune=lambda sd, cfg: prefixed(llama.hf_to_tune(sd, cfg)),
        tune_to_hf=lambda sd, cfg: llama.tune_to_hf(
            {k.removeprefix("inner."): v for k, v in sd.items()}, cfg),
    ))
    path = copy_checkpoint(source[0], tmp_path / "buffered")
    _edit_config(path, model_type="test_buffered_llama")
    model = load_hf(path)
    assert model.scale.item() == 1.0
    assert max_diff(tune_logits(model, batch), hf_logits(source[1], *batch), batch) < ATOL


def test_tensors_covering_part_of_their_storage_are_written(tmp_path):
    """FSDP2's gathered full tensors of an odd row count (GPT-2's 50257-row embedding on 2 ranks)
    are views of the padded all-gather buffer; safetensors refuses those unless copied out."""
    padded = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    sd = {"wte": padded[:5], "other": torch.ones(2)}
    assert sd["wte"].is_contiguous() and sd["wte"].untyped_storage().nbytes() > sd["wte"].numel() * 4
    hf._write_weights(hf._for_safetensors(sd, None), str(tmp_path), hf.DEFAULT_MAX_SHARD_SIZE)
    back = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(back["wte"], padded[:5]) and torch.equal(back["other"], sd["other"])
