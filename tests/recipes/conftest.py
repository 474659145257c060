"""Shared helpers for recipe tests: config overrides and an in-process recipe runner (the tiny
assets are fixtures of tests/conftest.py)."""

import json
import os
import sys

from omegaconf import OmegaConf

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_CONFIG = os.path.join(REPO, "configs", "tiny_cpu.yaml")
TINY_T5_CONFIG = os.path.join(REPO, "configs", "tiny_t5_cpu.yaml")

# Small and fast: 3 optimizer steps of 8 samples, short generations.
FAST = [
    "epochs=1",
    "max_steps_per_epoch=3",
    "sgo.max_new_tokens=8",
    "validation.max_examples=8",
    "validation.batch_size=8",
]


def make_cfg(assets_dir, output_dir, *overrides, config=TINY_CONFIG):
    cfg = OmegaConf.load(config)
    dotlist = [f"assets_dir={assets_dir}", f"output_dir={output_dir}", *FAST, *overrides]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(dotlist))


def run_recipe(assets_dir, output_dir, *overrides, config=TINY_CONFIG):
    """Run the recipe in this process; returns (recipe, metrics rows)."""
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    recipe = KDOffPolicyRecipe(make_cfg(assets_dir, output_dir, *overrides, config=config))
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return recipe, read_metrics(output_dir)


def read_metrics(output_dir, with_start=False):
    """The metric rows of optimizer steps (``with_start``: also distillm's step-0 row, the
    scheduler's starting validation loss)."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows if with_start else [r for r in rows if r["step"] > 0]


def tune_cmd(*args, nproc=None):
    """The user's command line: ``tune run [--nproc_per_node N] distillm_tune/recipes/kd_offpolicy ...``."""
    launcher = [sys.executable, "-m", "torchtune._cli.tune", "run"]
    if nproc:
        launcher += ["--nproc_per_node", str(nproc)]
    return launcher + ["distillm_tune/recipes/kd_offpolicy", "--config", TINY_CONFIG, *FAST, *args]


def subprocess_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


LORA = "student.lora={lora_attn_modules: [q_proj, v_proj], lora_rank: 4, lora_alpha: 8}"


def hf_weights(output_dir):
    from safetensors.torch import load_file

    return load_file(os.path.join(output_dir, "hf_model", "model.safetensors"))


# Per-step losses of two runs whose fp32 sums run in another order (1 vs 2 processes: the sharded
# forward and the all-reduce; 1 vs 2 threads). Measured spread, 2026-12-08, distillm2 paper_full on
# the tiny config: AMD EPYC 2 vCPUs, 1 vs 2 threads max rel 1.6e-6, 1 vs 2 processes 1.8e-6; on
# another AMD EPYC machine 1 vs 2 processes 1.1e-5 (loss_skl, step 4). About 10x the largest:
PROCESS_LOSS_REL = 1e-4


def assert_same_losses(rows_a, rows_b, rel, keys=("loss",)):
    """Two runs logged the same per-step values (up to ``rel``)."""
    import pytest

    for a, b in zip(rows_a, rows_b):
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=rel), (a["step"], key)


def assert_same_weights(dir_a, dir_b, rtol, atol):
    """The students two runs exported hold the same weights (compared in fp32)."""
    import torch

    wa, wb = hf_weights(dir_a), hf_weights(dir_b)
    for k in wb:
        torch.testing.assert_close(wa[k].float(), wb[k].float(), rtol=rtol, atol=atol)


def last_by_step(rows):
    """Per step, the row logged last (a resumed run logs again the steps after its checkpoint)."""
    return {r["step"]: r for r in rows}


# Imported at start-up by every Python process of a test's run (launcher and torchrun workers
# alike) when its folder leads PYTHONPATH: sends KILL_SIGNAL (SIGKILL if unset) to the process of
# rank KILL_RANK (any rank if unset) at step KILL_STEP: right after that checkpoint is complete
# (after_save), while it is half written (during_save: after the model/ shards, before optimizer/), or
# as that training step begins (step; one micro-batch per step). ``signal.raise_signal`` runs the
# signal's Python handler before it returns, so a SIGINT/SIGTERM acts at exactly that point (an
# ``os.kill`` of itself is handled at some later bytecode, which let a run finish first).
KILLER = r'''
import os
if os.environ.get("KILL_STEP") and os.environ.get("RANK", "0") == os.environ.get("KILL_RANK", os.environ.get("RANK", "0")):
    import signal
    import torch
    from distillm_tune.training import checkpointing

    kill_step, phase = int(os.environ["KILL_STEP"]), os.environ["KILL_PHASE"]
    sig = getattr(signal, os.environ.get("KILL_SIGNAL", "SIGKILL"))
    torn = "." + checkpointing.RecipeCheckpointer.name(kill_step) + ".tmp"
    if phase == "after_save":
        original = checkpointing.RecipeCheckpointer.save
        def save(self, step, *args, **kwargs):
            path = original(self, step, *args, **kwargs)
            if step == kill_step:
                signal.raise_signal(sig)
            return path
        checkpointing.RecipeCheckpointer.save = save
    elif phase == "during_save":
        original_dcp_save = checkpointing.dcp_save
        def dcp_save(state_dict, folder):
            if torn in str(folder) and str(folder).endswith("optimizer"):
                signal.raise_signal(sig)
            return original_dcp_save(state_dict, folder)
        checkpointing.dcp_save = dcp_save
    else:  # the recipe runs as __main__ (runpy): patch what it imports, before it does
        import distillm_tune.sgo as sgo
        original_uniform, calls = sgo.shared_uniform, []
        def shared_uniform(*a, **k):  # drawn once per micro-batch
            calls.append(1)
            if len(calls) == kill_step:
                signal.raise_signal(sig)
            return original_uniform(*a, **k)
        sgo.shared_uniform = shared_uniform
'''


def killer_env(tmp_path, step, phase="after_save", rank=None, signal_name="SIGKILL"):
    """Environment for a ``tune run`` that KILLER interrupts (see above)."""
    hook = os.path.join(str(tmp_path), "kill_hook")
    os.makedirs(hook, exist_ok=True)
    with open(os.path.join(hook, "sitecustomize.py"), "w") as f:
        f.write(KILLER)
    env = subprocess_env()
    env.update(KILL_STEP=str(step), KILL_PHASE=phase, KILL_SIGNAL=signal_name,
               PYTHONPATH=hook + os.pathsep + env["PYTHONPATH"])
    if rank is not None:
        env["KILL_RANK"] = str(rank)
    return env
