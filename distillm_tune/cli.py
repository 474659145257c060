"""``distillm-tune``: torchtune's CLI (``tune ls / cp / run / validate``) for this plugin's recipes
and the configs shipped inside the package.

    distillm-tune ls
    distillm-tune cp tiny_cpu my_config.yaml
    distillm-tune run [--nproc_per_node 2 --nnodes 1 ...] kd_offpolicy --config tiny_cpu key=value ...
    distillm-tune validate tiny_cpu key=value ...

``run`` resolves a shipped config name (or takes a path) and hands over to ``tune run`` with the
recipe's module path, so every torchrun option of ``tune run`` works. ``validate`` runs
torchtune's ``tune validate`` and then the recipe's own checks (unknown keys with a did-you-mean,
types and ranges, component arguments and values, then the files: checkpoint folders, tokenizers,
data, the output directory) without loading a model or writing anything: "valid" means the run
would start; ``--config-only`` checks the config alone.
"""

import argparse
import glob
import os
import shutil
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
# recipe name -> its module path, as ``tune run`` takes a custom recipe (run with ``python -m``)
RECIPES: Dict[str, str] = {
    "kd_offpolicy": "distillm_tune/recipes/kd_offpolicy",
    "evaluate": "distillm_tune/recipes/evaluate",
}


def recipe_of_config(name: str) -> str:
    """The recipe a shipped config belongs to (evaluation configs start with ``evaluate``)."""
    return "evaluate" if os.path.basename(name).startswith("evaluate") else "kd_offpolicy"


def shipped_configs() -> List[str]:
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONFIG_DIR, "*.yaml")))


def resolve_config(name_or_path: str) -> str:
    """A config file path: an existing path as given, else a shipped config's name (``.yaml`` optional)."""
    if os.path.isfile(name_or_path):
        return os.path.abspath(name_or_path)
    name = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
    path = os.path.join(CONFIG_DIR, name + ".yaml")
    if os.path.sep not in name and os.path.isfile(path):
        return path
    raise SystemExit(f"error: config {name_or_path!r} is neither a file nor a shipped config; "
                     f"shipped: {', '.join(shipped_configs())} (distillm-tune ls)")


def _ls(_: argparse.Namespace) -> None:
    rows = [(recipe, name) for recipe in RECIPES for name in shipped_configs() if recipe_of_config(name) == recipe]
    width = max(len(r) for r in RECIPES) + 2
    print(f"{'RECIPE':<{width}}CONFIG")
    for recipe in RECIPES:
        names = [n for r, n in rows if r == recipe]
        for i, name in enumerate(names):
            print(f"{recipe if i == 0 else '':<{width}}{name}")


def _cp(args: argparse.Namespace) -> None:
    source = resolve_config(args.config)
    dest = os.path.join(args.dest, os.path.basename(source)) if os.path.isdir(args.dest) else args.dest
    if os.path.exists(dest):
        raise SystemExit(f"error: {dest} already exists; not overwritten")
    if os.path.dirname(dest) and not os.path.isdir(os.path.dirname(dest)):
        raise SystemExit(f"error: the folder of {dest} does not exist")
    shutil.copyfile(source, dest)
    print(f"Copied {source} to {dest}")


def _recipe_class(recipe: str):
    if recipe == "kd_offpolicy":
        from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe as Recipe
    else:
        from distillm_tune.recipes.evaluate import EvaluateRecipe as Recipe
    return Recipe


def check_config(cfg, recipe: str):
    """The recipe's own checks of a config (nothing is read); returns it with the defaults."""
    return sys.modules[_recipe_class(recipe).__module__].check_config(cfg)


def preflight(cfg, recipe: str) -> None:
    """Every check the recipe makes before it loads a model (checkpoint folders, tokenizers, data,
    the output directory), writing nothing: passing means the run would start."""
    _recipe_class(recipe)(cfg).preflight(dry_run=True)


def _validate(args: argparse.Namespace) -> None:
    from omegaconf import OmegaConf
    from torchtune import config as tt_config
    from torchtune.config._errors import ConfigError

    path = resolve_config(args.config)
    cfg = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(args.overrides)))
    recipe = args.recipe or recipe_of_config(path)
    try:
        check_config(cfg, recipe)  # the recipe's schema: names the key and suggests the nearest
        tt_config.validate(cfg)  # what ``tune validate`` checks: every component's arguments bind
        if not args.config_only:
            preflight(cfg, recipe)
    except (ConfigError, ValueError, TypeError, OSError, RuntimeError) as e:  # RuntimeError: no such device here
        raise SystemExit(f"error: {path}: {e}")
    print(f"Config is well-formed for recipe {recipe}!" if args.config_only else
          f"Config is valid for recipe {recipe}: the run would start (its files checked, nothing loaded or written)")


def _split_run_args(argv: Sequence[str]) -> List[str]:
    """``[torchrun options] RECIPE --config NAME|PATH [overrides]`` -> the ``tune run`` command."""
    argv = list(argv)
    # the recipe: a shipped recipe's name or a recipe file (``path/recipe`` or ``path/recipe.py``);
    # a torchrun option's value (``--log_dir /tmp/logs``) is neither
    at = next((i for i, a in enumerate(argv) if a in RECIPES or (
        not a.startswith("-") and (a.endswith(".py") or os.path.isfile(a + ".py")))), None)
    if at is None:
        raise SystemExit(f"error: name a recipe: one of {', '.join(RECIPES)} (distillm-tune ls)")
    launcher, recipe, rest = argv[:at], argv[at], argv[at + 1:]
    if "--config" not in rest or rest.index("--config") + 1 >= len(rest):
        raise SystemExit("error: the '--config NAME|PATH' argument is required")
    i = rest.index("--config") + 1
    rest[i] = resolve_config(rest[i])
    return [sys.executable, "-m", "torchtune._cli.tune", "run", *launcher, RECIPES.get(recipe, recipe), *rest]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # everything after ``run`` belongs to ``tune run``
        return subprocess.call(_split_run_args(argv[1:]))
    parser = argparse.ArgumentParser(prog="distillm-tune", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list the recipes and their shipped configs").set_defaults(func=_ls)
    cp = sub.add_parser("cp", help="copy a shipped config to edit it")
    cp.add_argument("config")
    cp.add_argument("dest")
    cp.set_defaults(func=_cp)
    sub.add_parser("run", help="[torchrun options] RECIPE --config NAME|PATH [key=value ...]: tune run")
    val = sub.add_parser("validate", help="check a config (name or path), overrides and the files they name, loading no model")
    val.add_argument("config")
    val.add_argument("overrides", nargs="*", help="key=value, as on the tune run command line")
    val.add_argument("--recipe", choices=list(RECIPES), help="default: from the config's name")
    val.add_argument("--config-only", action="store_true",
                     help="check the config's keys and values only, not the files it names (before they exist)")
    val.set_defaults(func=_validate)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
