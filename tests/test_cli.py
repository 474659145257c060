"""The ``distillm-tune`` CLI and the shipped configs, as a torchtune user meets them.

Every shipped config passes torchtune's own ``tune validate`` as shipped and ``distillm-tune
validate`` (torchtune's check plus the recipe's schema) with its path placeholders pointed
elsewhere; typos fail naming the key and a suggestion; ``ls`` / ``cp`` / the ``run`` hand-over.
The installed-wheel runs are ``tests/test_install.py``.
"""

import glob
import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from distillm_tune import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = sorted(glob.glob(os.path.join(cli.CONFIG_DIR, "*.yaml")))
PATH_KEYS = ("assets_dir", "checkpoints_dir", "data_dir", "output_dir", "model_dir")


def test_configs_ship_inside_the_package_and_configs_dir_is_the_same():
    names = [os.path.basename(p) for p in SHIPPED]
    assert len(names) >= 15 and "tiny_cpu.yaml" in names
    # the repository's configs/ (where users and scripts look) is the package's folder
    assert os.path.realpath(os.path.join(REPO, "configs")) == os.path.realpath(cli.CONFIG_DIR)


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_tune_validate_accepts_every_shipped_config(path, capsys):
    # torchtune's own `tune validate`, run through its CLI entry point in this process
    from torchtune._cli.tune import TuneCLIParser

    parser = TuneCLIParser()
    parser.run(parser._parser.parse_args(["validate", path]))
    assert "Config is well-formed!" in capsys.readouterr().out


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_distillm_tune_validate_with_placeholders_filled(path, tmp_path, capsys):
    raw = OmegaConf.load(path)
    filled = [f"{k}={tmp_path / k}" for k in PATH_KEYS if k in raw]
    assert filled, "every shipped config has path placeholders"
    assert cli.main(["validate", "--config-only", path, *filled]) == 0
    assert f"well-formed for recipe {cli.recipe_of_config(path)}" in capsys.readouterr().out
    # without --config-only: the files too (a GPU config on this CPU machine stops at its device first)
    with pytest.raises(SystemExit, match="does not exist|not available on this hardware"):
        cli.main(["validate", path, *filled])


@pytest.mark.parametrize("config", ["tiny_cpu", "evaluate_tiny"])
def test_validate_checks_the_files_of_a_run_that_would_start(config, tiny_assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["validate", config, f"assets_dir={tiny_assets}", f"output_dir={out}"]) == 0
    assert f"valid for recipe {cli.recipe_of_config(config)}: the run would start" in capsys.readouterr().out
    assert not out.exists()  # nothing written


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("edit,message", [
    (("batch_size: 8", "batch_sise: 8"), r"config batch_sise: unknown key; did you mean batch_size\?"),
    (("    phi0: 0.0", "    phi_0: 0.0"), r"config sgo.scheduler.phi_0: .*AdaptiveSGOScheduler takes no argument "
                                         r"'phi_0'; did you mean sgo.scheduler.phi0\?"),
    (("  weight_decay: 0.01", "  weight_decy: 0.01"), r"config optimizer.weight_decy: .*did you mean optimizer.weight_decay\?"),
    (("  on_nonfinite: skip", "  on_nonfinit: skip"), r"config guards.on_nonfinit: unknown key; did you mean guards.on_nonfinite\?"),
])
def test_typo_in_a_config_file_fails_naming_key_and_suggestion(tmp_path, edit, message):
    text = open(os.path.join(cli.CONFIG_DIR, "tiny_cpu.yaml")).read()
    assert edit[0] in text
    path = _write(tmp_path, "typo.yaml", text.replace(edit[0], edit[1], 1))
    with pytest.raises(SystemExit, match=message):
        cli.main(["validate", path])


@pytest.mark.parametrize("override,message", [
    ("sgo.phi_0=0.5", r"config sgo.phi_0: unknown key; did you mean sgo.scheduler.phi0\?"),
    ("batch_sise=4", r"config batch_sise: unknown key; did you mean batch_size\?"),
    ("lr_scheduler.num_warmup_step=3", r"config lr_scheduler.num_warmup_step: .*did you mean lr_scheduler.num_warmup_steps\?"),
    ("temperatur=0.5", r"config temperatur: unknown key; did you mean temperature\?"),  # evaluate config
])
def test_typo_in_an_override_fails_naming_key_and_suggestion(override, message):
    config = "evaluate_tiny" if override.startswith("temperatur") else "tiny_cpu"
    with pytest.raises(SystemExit, match=message):
        cli.main(["validate", config, override])


def test_ls_lists_every_recipe_and_shipped_config(capsys):
    cli.main(["ls"])
    out = capsys.readouterr().out
    for path in SHIPPED:
        assert os.path.splitext(os.path.basename(path))[0] in out
    assert "kd_offpolicy" in out and "evaluate" in out


def test_cp_copies_a_shipped_config_and_never_overwrites(tmp_path):
    dest = tmp_path / "mine.yaml"
    cli.main(["cp", "tiny_cpu", str(dest)])
    assert dest.read_text() == open(os.path.join(cli.CONFIG_DIR, "tiny_cpu.yaml")).read()
    dest.write_text("edited")
    with pytest.raises(SystemExit, match="already exists"):
        cli.main(["cp", "tiny_cpu", str(dest)])
    assert dest.read_text() == "edited"
    cli.main(["cp", "evaluate_tiny.yaml", str(tmp_path)])  # into a folder, by file name
    assert (tmp_path / "evaluate_tiny.yaml").is_file()


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(SystemExit, match=r"config 'tiny_gpu' is neither a file nor a shipped config; shipped: .*tiny_cpu"):
        cli.main(["validate", "tiny_gpu"])


def test_run_hands_over_to_tune_run_with_the_resolved_config_and_launcher_options(monkeypatch):
    cmd = cli._split_run_args(["--nproc_per_node", "2", "--nnodes", "1", "kd_offpolicy", "--config", "tiny_cpu",
                               "method=kd", "batch_size=4"])
    assert cmd[:4] == [sys.executable, "-m", "torchtune._cli.tune", "run"]
    assert cmd[4:9] == ["--nproc_per_node", "2", "--nnodes", "1", "distillm_tune/recipes/kd_offpolicy"]
    assert cmd[9:] == ["--config", os.path.join(cli.CONFIG_DIR, "tiny_cpu.yaml"), "method=kd", "batch_size=4"]
    with pytest.raises(SystemExit, match="--config"):
        cli._split_run_args(["kd_offpolicy", "method=kd"])
    # a launcher option's path value is not taken for the recipe; a recipe file path is passed on
    cmd = cli._split_run_args(["--log_dir", "/tmp/logs", "kd_offpolicy", "--config", "tiny_cpu"])
    assert cmd[4:7] == ["--log_dir", "/tmp/logs", "distillm_tune/recipes/kd_offpolicy"]
    monkeypatch.chdir(REPO)  # a recipe path is relative to where tune run is called
    cmd = cli._split_run_args(["distillm_tune/recipes/kd_offpolicy", "--config", "tiny_cpu"])
    assert cmd[4] == "distillm_tune/recipes/kd_offpolicy"


def test_console_script_is_installed():
    out = subprocess.run(["distillm-tune", "ls"], capture_output=True, text=True, check=True).stdout
    assert "tiny_cpu" in out
