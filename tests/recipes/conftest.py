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


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


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
