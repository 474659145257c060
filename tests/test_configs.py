"""Every config in configs/ and every pipeline in recipes/, without a GPU and in seconds.

Configs: each parses; with its path placeholders set, every interpolation resolves; every
``_component_`` imports; a distillation config has every key the recipe reads (the key set of
``configs/tiny_cpu.yaml``: all top-level keys, all ``sgo`` / ``validation`` sub-keys), an evaluation
config every key of ``configs/evaluate_tiny.yaml``; the paper configs carry the paper's
hyperparameters (DISTILLM_SPEC §6, table below); the recipes' constructors accept them once device
and dtype are moved to CPU / fp32.

Pipelines: ``bash -n``; then each runs with a fake ``tune`` / ``python`` that only records its
command line and writes the files a real step leaves (hf_model/config.json, results.md, the seqkd
jsonl). Every recorded ``tune run`` is parsed back with torchtune's own CLI merge, so the overrides
the scripts build must give a config the recipe constructs. The real end-to-end runs on tiny CPU
models are ``slow``.
"""

import glob
import json
import os
import shutil
import subprocess
import sys
from typing import Dict, List

import pytest
from omegaconf import DictConfig, OmegaConf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs")
RECIPE_DIR = os.path.join(REPO, "recipes")
CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))
SCRIPTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(RECIPE_DIR, "*.sh")))
PIPELINES = [s for s in SCRIPTS if not s.startswith("_")]

# DISTILLM_SPEC §6 (paper App. D): lr, global batch, epochs; teacher / student checkpoint folders.
PAPER = {
    "gpt2_xl_to_gpt2.yaml": dict(lr=5e-4, batch=8, epochs=20, teacher="gpt2-xl", student="gpt2"),
    "gpt2_xl_to_gpt2_medium.yaml": dict(lr=5e-4, batch=8, epochs=20, teacher="gpt2-xl", student="gpt2-medium"),
    "gpt2_xl_to_gpt2_large.yaml": dict(lr=1e-4, batch=4, epochs=10, teacher="gpt2-xl", student="gpt2-large"),
    "opt_2.7b_to_125m.yaml": dict(lr=5e-5, batch=8, epochs=20, teacher="opt-2.7b", student="opt-125m"),
    "opt_2.7b_to_350m.yaml": dict(lr=5e-5, batch=8, epochs=20, teacher="opt-2.7b", student="opt-350m"),
    "opt_2.7b_to_1.3b.yaml": dict(lr=5e-5, batch=8, epochs=10, teacher="opt-2.7b", student="opt-1.3b"),
    "openllama_3b_lora.yaml": dict(lr=5e-4, batch=8, epochs=10, teacher="open_llama_7b_v2", student="open_llama_3b_v2"),
    "t5_xl_to_small_samsum.yaml": dict(lr=1e-4, batch=32, epochs=10, teacher="t5-v1_1-xl-samsum", student="t5-v1_1-small"),
    "mt5_xl_to_small_iwslt.yaml": dict(lr=1e-4, batch=32, epochs=2, teacher="mt5-xl-iwslt", student="mt5-small"),
}
SEQ2SEQ_TASKS = {"t5_xl_to_small_samsum.yaml": "samsum", "mt5_xl_to_small_iwslt.yaml": "iwslt"}


def _load(name: str) -> DictConfig:
    return OmegaConf.load(os.path.join(CONFIG_DIR, name))


# `key in cfg` is False for a ??? value: look at the keys
def _is_kd(cfg: DictConfig) -> bool:
    return "student" in cfg.keys()


def _is_eval(cfg: DictConfig) -> bool:
    return {"datasets", "model_dir"} <= set(cfg.keys())


def _missing_vars(cfg: DictConfig) -> List[str]:
    """The top-level path placeholders (``/tmp/distillm_tune/...``, as torchtune's configs have
    ``/tmp/...`` paths: they pass ``tune validate`` and are meant to be set)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    return [k for k, v in raw.items() if isinstance(v, str) and v.startswith("/tmp/distillm_tune/")]


def _filled(name: str, tmp_path) -> DictConfig:
    """The config with each top-level path placeholder set to its own folder under tmp_path."""
    cfg = _load(name)
    for key in _missing_vars(cfg):
        cfg[key] = str(tmp_path / key)
    return cfg


def _components(node, where="") -> Dict[str, str]:
    found = {}
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "_component_":
                found[where or "<root>"] = v
            else:
                found.update(_components(v, f"{where}.{k}" if where else str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found.update(_components(v, f"{where}[{i}]"))
    return found


def _on_cpu(cfg: DictConfig) -> DictConfig:
    return OmegaConf.merge(cfg, {"device": "cpu", "dtype": "fp32"})


# ------------------------------------------------------------------------------------- configs


def test_every_config_is_kd_or_eval():
    assert {"tiny_cpu.yaml", "evaluate_tiny.yaml"} <= set(CONFIGS)
    for name in CONFIGS:
        cfg = _load(name)
        assert _is_kd(cfg) != _is_eval(cfg), f"{name}: neither a kd_offpolicy nor an evaluate config"


# Modern pairs (issue #10), not the paper's: torchtune's own KD configs' lr, global batch, epochs,
# kd_ratio and LoRA rank; SmolLM2 on CPU.
MODERN = {
    "llama3_1_8b_to_llama3_2_1b_lora.yaml": dict(lr=3e-4, batch=32, epochs=1, kd_ratio=0.5, rank=64),
    "qwen2_5_1_5b_to_0_5b.yaml": dict(lr=3e-4, batch=64, epochs=1, kd_ratio=0.5, rank=32),
    "smollm2_135m_to_6layer_cpu.yaml": dict(lr=1e-4, batch=8, epochs=1, kd_ratio=1.0, rank=None),
}


def test_every_paper_config_is_in_the_table():
    kd = {n for n in CONFIGS if _is_kd(_load(n)) and not n.startswith("tiny")} - set(MODERN)
    assert kd == set(PAPER), "add new paper configs to PAPER (lr, batch, epochs from DISTILLM_SPEC §6)"


@pytest.mark.parametrize("name", sorted(MODERN))
def test_modern_pair_settings(name, tmp_path):
    cfg = _filled(name, tmp_path)
    want = MODERN[name]
    assert float(cfg.optimizer.lr) == want["lr"] and int(cfg.epochs) == want["epochs"]
    assert int(cfg.batch_size) * int(cfg.gradient_accumulation_steps) == want["batch"]
    assert float(cfg.kd_ratio) == want["kd_ratio"]
    assert (cfg.student.lora.lora_rank if cfg.student.lora else None) == want["rank"]
    assert cfg.dataset.template == "chat" and OmegaConf.to_container(cfg, resolve=True)["validation"]["dataset"]["template"] == "chat"


@pytest.mark.parametrize("name", CONFIGS)
def test_interpolations_resolve(name, tmp_path):
    cfg = _filled(name, tmp_path)
    OmegaConf.resolve(cfg)  # raises on a dangling ${...}
    assert not OmegaConf.missing_keys(cfg), f"{name}: values left ??? (tune validate fails on them)"
    if name not in ("tiny_cpu.yaml", "tiny_t5_cpu.yaml", "evaluate_tiny.yaml"):
        # the GPU configs take every path from checkpoints_dir / data_dir / output_dir (or model_dir)
        assert set(_missing_vars(_load(name))) >= {"data_dir", "output_dir"}


@pytest.mark.parametrize("name", CONFIGS)
def test_components_import(name, tmp_path):
    from torchtune.config._utils import _get_component_from_path

    cfg = OmegaConf.to_container(_filled(name, tmp_path), resolve=True)
    comps = _components(cfg)
    if _is_kd(_load(name)):
        assert {"dataset", "validation.dataset", "optimizer", "lr_scheduler", "metric_logger"} <= set(comps)
    for where, path in comps.items():
        assert callable(_get_component_from_path(path)), f"{name}: {where}._component_ {path}"


@pytest.mark.parametrize("name", CONFIGS)
def test_has_every_key_the_recipe_reads(name):
    cfg = _load(name)
    ref = _load("tiny_cpu.yaml" if _is_kd(cfg) else "evaluate_tiny.yaml")
    # the path variables (assets_dir) are each config's own; everything else must be there
    top = set(ref.keys()) - {"assets_dir"}
    assert top <= set(cfg.keys()), f"{name} lacks {sorted(top - set(cfg.keys()))}"
    if _is_kd(cfg):
        for section in ("sgo", "validation", "student", "teacher", "lm", "optimizer", "lr_scheduler"):
            missing = set(ref[section].keys()) - set(cfg[section].keys())
            assert not missing, f"{name}: {section} lacks {sorted(missing)}"
        for section in ("dataset", "validation.dataset"):
            assert {"_component_", "source"} <= set(OmegaConf.select(cfg, section).keys())


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyperparameters(name, tmp_path):
    cfg = _filled(name, tmp_path)
    OmegaConf.resolve(cfg)
    want = PAPER[name]
    assert cfg.optimizer.lr == pytest.approx(want["lr"])
    assert cfg.batch_size == want["batch"] and cfg.gradient_accumulation_steps == 1
    assert cfg.epochs == want["epochs"] and cfg.max_steps_per_epoch is None
    assert os.path.basename(cfg.teacher.checkpoint_dir) == want["teacher"]
    assert os.path.basename(cfg.student.checkpoint_dir) == want["student"]
    assert cfg.student.checkpoint_dir.startswith(cfg.checkpoints_dir)
    assert cfg.teacher.checkpoint_dir.startswith(cfg.checkpoints_dir)
    # common to all (spec §6): AdamW wd 0.01, cosine to 1e-7 without warmup, clip 1.0
    assert cfg.optimizer._component_ == "torch.optim.AdamW" and cfg.optimizer.weight_decay == 0.01
    assert cfg.lr_scheduler._component_ == "distillm_tune.training.cosine_with_floor"
    assert cfg.lr_scheduler.num_warmup_steps == 0 and cfg.lr_scheduler.min_lr == pytest.approx(1e-7)
    assert cfg.clip_grad_norm == 1.0
    # DistiLLM: SRKL alpha 0.1 through the method's default (loss left empty for the baselines)
    from distillm_tune.recipes.kd_offpolicy import METHOD_LOSSES

    assert cfg.method == "distillm" and not cfg.loss and cfg.kd_ratio == 1.0
    assert METHOD_LOSSES["distillm"] == ("distillm_tune.losses.SkewReverseKLLoss", {"alpha": 0.1})
    assert (cfg.sgo.temperature, cfg.sgo.top_p, cfg.sgo.top_k) == (1.0, 1.0, None)
    assert cfg.sgo.replay_buffer.capacity == 1000 and cfg.sgo.scheduler.num_stages == 10
    assert cfg.sgo.scheduler.replay_ratio == "decreasing" and cfg.sgo.gkd_sgo_prob == 0.5
    llama = name == "openllama_3b_lora.yaml"
    assert (cfg.sgo.scheduler.phi0, cfg.sgo.scheduler.tolerance) == ((0.2, 0.2) if llama else (0.0, 0.1))
    assert cfg.validation.every_n_steps is None or name in SEQ2SEQ_TASKS
    assert cfg.validation.max_examples is None
    # GPU settings
    assert (cfg.device, cfg.dtype) == ("cuda", "bf16")
    assert cfg.save_every_n_steps == 1000 and cfg.resume_from_checkpoint is False
    assert cfg.metric_logger._component_ == "distillm_tune.training.JsonlMetricLogger"
    assert cfg.metric_logger.log_dir == cfg.output_dir
    assert cfg.enable_activation_checkpointing == (name.startswith("opt_") or llama)
    if name in SEQ2SEQ_TASKS:
        for d in (cfg.dataset, cfg.validation.dataset):
            assert d._component_ == "distillm_tune.data.seq2seq_dataset"
            assert d.task == SEQ2SEQ_TASKS[name]
            assert (d.max_source_len, d.max_target_len) == (512, 128)
        assert cfg.dataset.source.endswith("/train.jsonl")
        assert cfg.validation.dataset.source.endswith("/validation.jsonl")
        assert cfg.sgo.max_new_tokens == 128 and cfg.student.lora is None
        assert cfg.lm.dataset is None  # the LM term is for decoder-only students
        assert cfg.num_output_chunks == 0  # T5 logits are dense
    else:
        assert (cfg.max_seq_len, cfg.max_prompt_len, cfg.sgo.max_new_tokens) == (512, 256, 256)
        assert cfg.num_output_chunks == 8
        train, valid = cfg.dataset, cfg.validation.dataset
        assert train._component_ == valid._component_ == "distillm_tune.data.instruction_dataset"
        assert (train.split, valid.split) == ("train", "valid")
        assert train.source == valid.source and train.source.endswith("databricks-dolly-15k.jsonl")
        # the same split of one file: 14k / 500 / 500
        for key, value in (("valid_size", 500), ("test_size", 500), ("seed", 1)):
            assert train[key] == valid[key] == value
        for d in (train, valid):
            assert (d.max_seq_len, d.max_prompt_len) == (512, 256)
        if llama:
            lora = cfg.student.lora
            assert list(lora.lora_attn_modules) == ["q_proj", "v_proj"]
            assert (lora.lora_rank, lora.lora_alpha) == (16, 32)
            assert not lora.apply_lora_to_mlp and not lora.apply_lora_to_output
        else:
            assert cfg.student.lora is None


@pytest.mark.parametrize("name", [n for n in CONFIGS if _is_kd(_load(n))])
def test_kd_recipe_constructs(name, tmp_path):
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    cfg = _on_cpu(_filled(name, tmp_path))
    recipe = KDOffPolicyRecipe(cfg)
    assert recipe.method == cfg.method and recipe.batch_size == cfg.batch_size
    assert recipe.max_new_tokens == cfg.sgo.max_new_tokens
    assert not recipe.distributed


@pytest.mark.parametrize("name", [n for n in CONFIGS if _is_eval(_load(n))])
def test_eval_recipe_constructs(name, tmp_path):
    """EvaluateRecipe's checks (dataset kinds, languages, budgets) pass; files are stand-ins."""
    from distillm_tune.recipes.evaluate import EvaluateRecipe

    cfg = _filled(name, tmp_path)
    if name == "evaluate_tiny.yaml":
        cfg.assets_dir = str(tmp_path / "assets")
    model_type = "gpt2" if any(d.kind == "instruction" for d in cfg.datasets) else "mt5"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": model_type}))
    cfg.model_dir = str(model_dir)
    for d in OmegaConf.to_container(cfg.datasets, resolve=True):
        os.makedirs(os.path.dirname(d["path"]), exist_ok=True)
        open(d["path"], "w").close()
    recipe = EvaluateRecipe(_on_cpu(cfg))
    assert recipe.seq2seq == (model_type == "mt5")
    if name != "evaluate_tiny.yaml":  # the paper's protocol (spec §5)
        assert recipe.seeds == [10, 20, 30, 40, 50] and recipe.temperature == 1.0
        assert (recipe.max_seq_len, recipe.max_prompt_len, recipe.greedy_new) == (512, 256, 128)
        assert recipe.max_source_len == 512 and (cfg.device, cfg.dtype) == ("cuda", "bf16")


# ----------------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    path = os.path.join(RECIPE_DIR, script)
    proc = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    text = open(path).read()
    if not script.startswith("_"):
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "\nset -euo pipefail\n" in text and "# Usage" in text


FAKE_TUNE = r"""#!{python}
# Records its argv and writes what the real step leaves behind.
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(["tune"] + args) + "\n")
kv = dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))
out = kv["output_dir"]
os.makedirs(out, exist_ok=True)
if "distillm_tune/recipes/kd_offpolicy" in args:
    os.makedirs(os.path.join(out, "hf_model"), exist_ok=True)
    with open(os.path.join(out, "hf_model", "config.json"), "w") as f:
        json.dump({{"model_type": os.environ["FAKE_MODEL_TYPE"]}}, f)
else:
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("| dataset | metric | mean ± std | n |\n| fake | ROUGE-L | 1.00 ± 0.00 | 1 |\n")
"""

FAKE_PYTHON = r"""#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(["python"] + args) + "\n")
out = args[args.index("--out") + 1]
open(out, "w").close()
"""


def _fakes(tmp_path) -> Dict[str, str]:
    paths = {}
    for name, text in (("tune", FAKE_TUNE), ("python", FAKE_PYTHON)):
        p = tmp_path / f"fake_{name}"
        p.write_text(text.format(python=sys.executable))
        p.chmod(0o755)
        paths[name] = str(p)
    return paths


def _run_pipeline(script, tmp_path, env_extra, model_type="gpt2", check=True):
    fakes = _fakes(tmp_path)
    log = tmp_path / "commands.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("METHODS", "NPROC", "RUN_DIR", "CONFIG")}
    env.update(TUNE=fakes["tune"], PYTHON=fakes["python"], FAKE_LOG=str(log),
               FAKE_MODEL_TYPE=model_type, **env_extra)
    proc = subprocess.run(["bash", os.path.join(RECIPE_DIR, script), str(tmp_path / "run")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cmds = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc, cmds


def _merged_config(cmd: List[str]) -> DictConfig:
    """What the recipe would see: torchtune's own parsing of ``tune run RECIPE --config X k=v ...``."""
    from torchtune.config._parse import TuneRecipeArgumentParser
    from torchtune.config._utils import _merge_yaml_and_cli_args

    i = cmd.index("--config")
    yaml_args, cli_args = TuneRecipeArgumentParser(description="t").parse_known_args(cmd[i:])
    cfg = _merge_yaml_and_cli_args(yaml_args, cli_args)
    OmegaConf.resolve(cfg)
    return cfg


def _kv(cmd: List[str]) -> Dict[str, str]:
    out = {}
    for a in cmd:
        if "=" in a and not a.startswith("-"):
            k, v = a.split("=", 1)
            out[k] = v  # the last one wins, as in OmegaConf.from_dotlist
    return out


def _instruction_env(tmp_path) -> Dict[str, str]:
    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    for d in ("gpt2-xl", "gpt2", "opt-2.7b", "opt-125m", "open_llama_7b_v2", "open_llama_3b_v2"):
        (ckpt / d).mkdir(parents=True)
    for f in ("dolly/databricks-dolly-15k.jsonl", "dolly/test.jsonl", "vicuna/test.jsonl"):
        (data / f).parent.mkdir(parents=True, exist_ok=True)
        (data / f).write_text("")
    return {"CKPT_DIR": str(ckpt), "DATA_DIR": str(data)}


@pytest.mark.parametrize("script,teacher,student,config", [
    ("gpt2_xl_to_gpt2.sh", "gpt2-xl", "gpt2", "gpt2_xl_to_gpt2.yaml"),
    ("opt_2.7b_to_125m.sh", "opt-2.7b", "opt-125m", "opt_2.7b_to_125m.yaml"),
    ("openllama_7b_to_3b_lora.sh", "open_llama_7b_v2", "open_llama_3b_v2", "openllama_3b_lora.yaml"),
])
def test_instruction_pipeline_commands(script, teacher, student, config, tmp_path):
    from distillm_tune.recipes.evaluate import EvaluateRecipe
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    env = _instruction_env(tmp_path)
    lm = tmp_path / "data" / "owt.jsonl"
    lm.write_text("")
    env.update(NPROC="2", METHODS="kd seqkd distillm", LM_CORPUS=str(lm))
    proc, cmds = _run_pipeline(script, tmp_path, env)
    run = str(tmp_path / "run")
    assert "self_inst" in proc.stderr and "left out" in proc.stderr  # missing sets are reported
    kinds = [(c[0], c[c.index("--config") + 1] if "--config" in c else None) for c in cmds]
    train = [c for c in cmds if "distillm_tune/recipes/kd_offpolicy" in c]
    evals = [c for c in cmds if "distillm_tune/recipes/evaluate" in c]
    gens = [c for c in cmds if c[0] == "python"]
    assert len(train) == 5 and len(evals) == 5 and len(gens) == 1 and len(cmds) == 11, kinds
    outs = [_kv(c)["output_dir"] for c in train]
    assert outs == [f"{run}/{s}" for s in ("teacher_sft", "student_sft", "distill_kd", "distill_seqkd", "distill_distillm")]
    assert cmds.index(gens[0]) == cmds.index(train[3]) - 1  # teacher responses right before seqkd
    for c in train:
        assert c[1:4] == ["run", "--nproc_per_node", "2"]
        assert c[c.index("--config") + 1] == os.path.join(REPO, "configs", config)
    t_sft, s_sft = _kv(train[0]), _kv(train[1])
    assert t_sft["method"] == s_sft["method"] == "sft"
    assert t_sft["student.checkpoint_dir"] == f"{env['CKPT_DIR']}/{teacher}"
    assert s_sft["student.checkpoint_dir"] == f"{env['CKPT_DIR']}/{student}"
    assert int(s_sft["batch_size"]) == PAPER[config]["batch"] // 2  # global batch over NPROC=2
    for c, method in zip(train[2:], ("kd", "seqkd", "distillm")):
        kv = _kv(c)
        assert kv["method"] == method
        assert kv["student.checkpoint_dir"] == f"{run}/student_sft/hf_model"
        assert kv["teacher.checkpoint_dir"] == f"{run}/teacher_sft/hf_model"
    gen = gens[0]
    assert gen[1:3] == ["-m", "distillm_tune.scripts.generate_seqkd"]
    assert gen[gen.index("--model-dir") + 1] == f"{run}/teacher_sft/hf_model"
    assert gen[gen.index("--split") + 1] == "train"
    # every training command gives a config the recipe constructs
    for c in train:
        cfg = _merged_config(c)
        assert cfg.dataset.source == f"{env['DATA_DIR']}/dolly/databricks-dolly-15k.jsonl"
        KDOffPolicyRecipe(_on_cpu(cfg))
    seqkd = _merged_config(train[3])
    assert seqkd.seqkd_data == f"{run}/seqkd/train.jsonl" and seqkd.dataset.split == "all"
    assert seqkd.validation.dataset.split == "valid"
    distil = _merged_config(train[4])
    assert distil.lm.dataset.source == str(lm) and distil.lm.dataset.max_seq_len == 512
    assert distil.lm.dataset._component_ == "distillm_tune.data.pretrain_dataset"
    assert _merged_config(train[0]).lm.dataset is None  # the LM term only for distillation
    assert distil.optimizer.lr == PAPER[config]["lr"] and distil.epochs == PAPER[config]["epochs"]
    # evaluation of teacher, SFT student and each distilled student, on the sets that exist
    assert [_kv(c)["model_dir"] for c in evals] == [
        f"{run}/{s}/hf_model" for s in ("teacher_sft", "student_sft", "distill_kd", "distill_seqkd", "distill_distillm")]
    for c in evals:
        assert "--nproc_per_node" not in c
        cfg = _merged_config(c)
        assert [d.name for d in cfg.datasets] == ["dolly", "vicuna"]
        assert cfg.datasets[0].path == f"{env['DATA_DIR']}/dolly/test.jsonl"
        EvaluateRecipe(_on_cpu(cfg))
    summary = open(f"{run}/summary.md").read()
    for s in ("teacher_sft", "student_sft", "distill_kd", "distill_seqkd", "distill_distillm"):
        assert f"## {s}\n" in summary
    assert summary.count("| fake | ROUGE-L |") == 5


def test_pipeline_skips_done_steps_and_resumes(tmp_path):
    env = _instruction_env(tmp_path)
    run = tmp_path / "run"
    (run / "teacher_sft" / "hf_model").mkdir(parents=True)
    (run / "teacher_sft" / "hf_model" / "config.json").write_text('{"model_type": "gpt2"}')
    (run / "student_sft" / "checkpoints").mkdir(parents=True)
    (run / "student_sft" / "checkpoints" / "latest").write_text("step_00000010")
    (run / "teacher_sft" / "eval").mkdir()
    (run / "teacher_sft" / "eval" / "results.md").write_text("| done |\n")
    _, cmds = _run_pipeline("gpt2_xl_to_gpt2.sh", tmp_path, env)
    train = [c for c in cmds if "distillm_tune/recipes/kd_offpolicy" in c]
    assert [_kv(c)["output_dir"] for c in train] == [f"{run}/student_sft", f"{run}/distill_distillm"]
    assert "resume_from_checkpoint=true" in train[0] and "resume_from_checkpoint=true" not in train[1]
    assert "--nproc_per_node" not in train[0]  # NPROC=1: a plain single-process tune run
    evals = [c for c in cmds if "distillm_tune/recipes/evaluate" in c]
    assert [_kv(c)["output_dir"] for c in evals] == [f"{run}/student_sft/eval", f"{run}/distill_distillm/eval"]


def test_pipeline_uses_given_sft_checkpoints(tmp_path):
    env = _instruction_env(tmp_path)
    teacher, student = tmp_path / "my_teacher", tmp_path / "my_student"
    teacher.mkdir()
    student.mkdir()
    env.update(TEACHER_SFT_DIR=str(teacher), STUDENT_SFT_DIR=str(student), METHODS="gkd",
               TRAIN_ARGS="dtype=fp32 gradient_accumulation_steps=2")
    _, cmds = _run_pipeline("gpt2_xl_to_gpt2.sh", tmp_path, env)
    train = [c for c in cmds if "distillm_tune/recipes/kd_offpolicy" in c]
    assert len(train) == 1
    kv = _kv(train[0])
    assert (kv["method"], kv["student.checkpoint_dir"], kv["teacher.checkpoint_dir"]) == ("gkd", str(student), str(teacher))
    assert (kv["dtype"], kv["gradient_accumulation_steps"]) == ("fp32", "2")
    evals = [c for c in cmds if "distillm_tune/recipes/evaluate" in c]
    assert [_kv(c)["model_dir"] for c in evals][:2] == [str(teacher), str(student)]


@pytest.mark.parametrize("env_extra,message", [
    ({"CKPT_DIR": ""}, "CKPT_DIR"),
    ({"METHODS": "distillm minillm"}, "unknown method 'minillm'"),
    ({"NPROC": "3"}, "not divisible by NPROC=3"),
    ({"TEACHER": "nope"}, "teacher checkpoint"),
])
def test_pipeline_rejects_bad_settings_before_any_work(tmp_path, env_extra, message):
    env = _instruction_env(tmp_path)
    env.update(env_extra)
    proc, cmds = _run_pipeline("gpt2_xl_to_gpt2.sh", tmp_path, env, check=False)
    assert proc.returncode != 0 and message in proc.stderr and cmds == []


@pytest.mark.parametrize("task", ["samsum", "iwslt"])
def test_seq2seq_pipeline_commands(task, tmp_path):
    from distillm_tune.recipes.evaluate import EvaluateRecipe
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    ckpt, data = tmp_path / "ckpt", tmp_path / "data"
    names = {"samsum": ("t5-v1_1-xl", "t5-v1_1-small", "samsum", "t5_xl_to_small_samsum.yaml"),
             "iwslt": ("mt5-xl", "mt5-small", "iwslt2017_en_de", "mt5_xl_to_small_iwslt.yaml")}[task]
    teacher, student, folder, config = names
    for d in (teacher, student):
        (ckpt / d).mkdir(parents=True)
    (data / folder).mkdir(parents=True)
    for split in ("train", "validation", "test"):
        (data / folder / f"{split}.jsonl").write_text("")
    env = {"CKPT_DIR": str(ckpt), "DATA_DIR": str(data), "TASK": task, "NPROC": "4",
           "METHODS": "kd distillm"}
    proc, cmds = _run_pipeline("t5_xl_to_small_samsum.sh", tmp_path, env, model_type="mt5")
    run = str(tmp_path / "run")
    train = [c for c in cmds if "distillm_tune/recipes/kd_offpolicy" in c]
    evals = [c for c in cmds if "distillm_tune/recipes/evaluate" in c]
    assert len(train) == 4 and len(evals) == 4 and len(cmds) == 8
    t_sft = _merged_config(train[0])
    assert t_sft.method == "sft" and t_sft.student.checkpoint_dir == f"{ckpt}/{teacher}"
    assert list(t_sft.student.lora.lora_attn_modules) == ["q_proj", "k_proj", "v_proj", "output_proj"]
    assert (t_sft.student.lora.lora_rank, t_sft.student.lora.lora_alpha) == (16, 32)
    assert t_sft.optimizer.lr == 1e-4 and t_sft.epochs == PAPER[config]["epochs"]
    s_sft = _merged_config(train[1])
    assert s_sft.student.lora is None and s_sft.batch_size == 8  # 32 over NPROC=4
    for c in train:
        cfg = _merged_config(c)
        assert c[c.index("--config") + 1] == os.path.join(REPO, "configs", config)
        assert cfg.dataset.source == f"{data}/{folder}/train.jsonl"
        assert cfg.validation.dataset.source == f"{data}/{folder}/validation.jsonl"
        KDOffPolicyRecipe(_on_cpu(cfg))
    for c, method in zip(train[2:], ("kd", "distillm")):
        cfg = _merged_config(c)
        assert cfg.method == method and cfg.teacher.checkpoint_dir == f"{run}/teacher_sft/hf_model"
        assert cfg.student.checkpoint_dir == f"{run}/student_sft/hf_model"
    for c in evals:
        cfg = _merged_config(c)
        assert c[c.index("--config") + 1].endswith(f"evaluate_{task}.yaml")
        (entry,) = OmegaConf.to_container(cfg.datasets)
        assert entry["path"] == f"{data}/{folder}/test.jsonl"
        assert entry["kind"] == ("summarization" if task == "samsum" else "translation")
        if task == "iwslt":
            assert (entry["src_lang"], entry["tgt_lang"]) == ("en", "de")
        recipe = EvaluateRecipe(_on_cpu(cfg))
        assert recipe.seq2seq
    assert os.path.isfile(f"{run}/summary.md")


def test_seq2seq_pipeline_rejects_seqkd(tmp_path):
    env = {"CKPT_DIR": str(tmp_path), "DATA_DIR": str(tmp_path), "METHODS": "seqkd"}
    proc, cmds = _run_pipeline("t5_xl_to_small_samsum.sh", tmp_path, env, check=False)
    assert proc.returncode != 0 and "seqkd" in proc.stderr and cmds == []


# ---------------------------------------------------------------------- real runs (tiny, CPU)

TINY_TRAIN = ("device=cpu dtype=fp32 epochs=1 max_steps_per_epoch=2 sgo.max_new_tokens=8 sgo.scheduler.phi0=1.0 "
              "validation.max_examples=4 validation.batch_size=4 num_output_chunks=0 save_every_n_steps=null "
              "max_prompt_len=64 max_seq_len=96")
TINY_EVAL = "device=cpu dtype=fp32 max_examples=2 batch_size=4"


def _real_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("METHODS", "NPROC", "RUN_DIR", "CONFIG")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHON=sys.executable)
    tune = shutil.which("tune")
    assert tune is not None, "torchtune's `tune` command must be on PATH (it comes with pip install torchtune)"
    env["TUNE"] = tune
    return env


@pytest.mark.slow
def test_instruction_pipeline_runs_on_tiny_models(tmp_path):
    from distillm_tune.scripts.make_tiny_assets import make_tiny_assets

    assets = tmp_path / "assets"
    make_tiny_assets(str(assets), train=40, valid=4, test=4)
    data = tmp_path / "data"
    (data / "dolly").mkdir(parents=True)
    shutil.copy(assets / "data" / "train.jsonl", data / "dolly" / "databricks-dolly-15k.jsonl")
    shutil.copy(assets / "data" / "test.jsonl", data / "dolly" / "test.jsonl")
    env = _real_env(tmp_path)
    env.update(CKPT_DIR=str(assets), DATA_DIR=str(data), TEACHER="teacher", STUDENT="student",
               METHODS="seqkd", TRAIN_ARGS=TINY_TRAIN + " dataset.valid_size=4 dataset.test_size=4",
               EVAL_ARGS=TINY_EVAL + " seeds=[10] max_seq_len=96 max_prompt_len=64",
               SEQKD_ARGS="--max-prompt-len 64 --max-seq-len 96 --dtype fp32 --device cpu "
                          "--valid-size 4 --test-size 4")
    run = tmp_path / "run"
    proc = subprocess.run(["bash", os.path.join(RECIPE_DIR, "gpt2_xl_to_gpt2.sh"), str(run)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "seqkd" / "train.jsonl").is_file()
    for step in ("teacher_sft", "student_sft", "distill_seqkd"):
        assert (run / step / "hf_model" / "config.json").is_file()
        assert (run / step / "eval" / "results.json").is_file()
    summary = (run / "summary.md").read_text()
    assert summary.count("| dolly | ROUGE-L |") == 3


@pytest.mark.slow
def test_seq2seq_pipeline_runs_on_tiny_models(tmp_path):
    from distillm_tune.scripts.make_tiny_assets import make_tiny_seq2seq_assets

    assets = tmp_path / "assets"
    make_tiny_seq2seq_assets(str(assets), train=100, valid=4, test=4)  # SentencePiece needs the text
    env = _real_env(tmp_path)
    env.update(CKPT_DIR=str(assets), DATA_DIR=str(assets / "data"), TEACHER="teacher", STUDENT="student",
               TRAIN_FILE=str(assets / "data" / "train.jsonl"), VALID_FILE=str(assets / "data" / "valid.jsonl"),
               TEST_FILE=str(assets / "data" / "test.jsonl"), METHODS="distillm",
               TRAIN_ARGS=TINY_TRAIN + " dataset.max_target_len=32 validation.dataset.max_target_len=32",
               EVAL_ARGS=TINY_EVAL + " greedy_max_new_tokens=8 max_source_len=64")
    run = tmp_path / "run"
    proc = subprocess.run(["bash", os.path.join(RECIPE_DIR, "t5_xl_to_small_samsum.sh"), str(run)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "teacher_sft" / "peft_adapter").is_dir()  # the teacher was LoRA-tuned, then merged
    for step in ("teacher_sft", "student_sft", "distill_distillm"):
        assert (run / step / "eval" / "results.json").is_file()
    assert (run / "summary.md").read_text().count("| samsum | ROUGE-L |") == 3
