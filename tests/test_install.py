"""The package as a user installs it: a non-editable wheel, used from a folder without the
repository (``distillm-tune ls / cp / run`` with a shipped config name, and the demo), and an
install into an environment that already has another torch of the supported range (it is kept).

Each test builds an isolated virtual environment (no site-packages of the interpreter running the
tests, so it does not matter whether the checkout was installed in a venv or the system
interpreter) and lets pip resolve the wheel's declared dependencies in it, from the registry or
pip's wheel cache: the first within ``constraints.txt`` (the tested set), the second around a
torch it finds already installed.
"""

import glob
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sh(cmd, cwd, env, timeout=600):
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    dist = tmp_path_factory.mktemp("dist")
    # without build isolation where setuptools is at hand (no download of the build backend)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    _sh([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dist), REPO],
        cwd=str(dist), env=dict(os.environ))
    (path,) = glob.glob(str(dist / "distillm_tune-*.whl"))
    return path


def _venv(path):
    """An empty virtual environment of this Python; its interpreter and an environment that runs it."""
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    bin_dir = os.path.join(str(path), "bin")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env.update(PATH=bin_dir + os.pathsep + env["PATH"], HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="1")
    return os.path.join(bin_dir, "python"), env


@pytest.mark.slow
def test_wheel_runs_cli_recipe_and_demo_without_the_repository(wheel, tmp_path):
    python, env = _venv(tmp_path / "venv")
    _sh([python, "-m", "pip", "install", "-q", wheel, "-c", os.path.join(REPO, "constraints.txt")], cwd=str(tmp_path),
        env=env, timeout=1200)
    work = tmp_path / "work"  # a folder without the repository
    work.mkdir()
    where = _sh([python, "-c", "import distillm_tune, os; print(os.path.dirname(distillm_tune.__file__))"], str(work), env)
    assert where.strip().startswith(str(tmp_path / "venv")), f"imported from {where}"
    assert not os.path.exists(os.path.join(where.strip(), "..", "tests")), "the checkout leaked in"

    listing = _sh(["distillm-tune", "ls"], str(work), env)
    assert "tiny_cpu" in listing and "evaluate_tiny" in listing
    _sh(["distillm-tune", "cp", "tiny_cpu", "my_tiny.yaml"], str(work), env)
    assert (work / "my_tiny.yaml").read_text() == open(os.path.join(REPO, "configs", "tiny_cpu.yaml")).read()
    _sh(["distillm-tune", "validate", "--config-only", "my_tiny.yaml", "assets_dir=assets", "output_dir=out"],
        str(work), env)

    _sh([python, "-m", "distillm_tune.scripts.make_tiny_assets", "assets"], str(work), env)
    _sh(["distillm-tune", "validate", "my_tiny.yaml", "assets_dir=assets", "output_dir=out"], str(work), env)
    _sh(["distillm-tune", "run", "kd_offpolicy", "--config", "tiny_cpu", "assets_dir=assets", "output_dir=out",
         "method=kd", "epochs=1", "max_steps_per_epoch=2", "validation.max_examples=8"], str(work), env)
    assert os.path.isfile(work / "out" / "hf_model" / "config.json")
    rows = [json.loads(line) for line in open(work / "out" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2]

    _sh([python, "-m", "distillm_tune.scripts.demo", "--out", "demo", "--teacher-epochs", "1", "--student-epochs", "1",
         "--distil-epochs", "1", "--steps-per-epoch", "3", "--eval-examples", "4", "--eval-seeds", ""], str(work), env)
    results = json.load(open(work / "demo" / "results.json"))
    assert set(results) == {"teacher (SFT)", "student (SFT)", "student (kd)", "student (distillm)"}


OLD_PINS = ["torch==2.13.0", "torchao==0.14.1", "torchtune==0.6.1"]  # what pyproject.toml pinned before


def _metadata_only_wheel(folder, name, version):
    """A wheel holding only the metadata of ``name==version``: what pip reads to decide whether an
    installed package satisfies a requirement (a real torch wheel weighs a gigabyte)."""
    dist_info = f"{name}-{version}.dist-info"
    files = {f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{dist_info}/RECORD"] = "".join(f"{k},,\n" for k in files) + f"{dist_info}/RECORD,,\n"
    path = os.path.join(str(folder), f"{name}-{version}-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
    return path


def _planned_installs(python, env, cwd, target):
    """What ``pip install target`` would install in that environment: {name: version}."""
    report = os.path.join(str(cwd), "report.json")
    _sh([python, "-m", "pip", "install", "--dry-run", "--quiet", "--report", report, str(target)], str(cwd), env,
        timeout=1200)
    return {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in json.load(open(report))["install"]}


@pytest.mark.slow
def test_install_keeps_another_supported_torch(wheel, tmp_path):
    """An environment holding torch 2.14.1 (the registry's other release in the supported range):
    pip's plan for the wheel, every dependency resolved, installs the package and keeps that torch;
    the former exact pins would have replaced it (the control)."""
    python, env = _venv(tmp_path / "venv")
    _sh([python, "-m", "pip", "install", "-q", "--no-deps", _metadata_only_wheel(tmp_path, "torch", "2.14.1")],
        str(tmp_path), env)
    version = [python, "-c", "from importlib.metadata import version; print(version('torch'))"]
    assert _sh(version, str(tmp_path), env).strip() == "2.14.1"

    planned = _planned_installs(python, env, tmp_path, wheel)
    assert planned.get("distillm-tune") == "0.1.0" and "torchtune" in planned, planned
    assert "torch" not in planned, planned  # kept

    old = tmp_path / "old_pins"
    old.mkdir()
    (old / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "old-pins"
        version = "0"
        dependencies = {json.dumps(OLD_PINS)}
        [tool.setuptools]
        py-modules = []
        """))
    planned = _planned_installs(python, env, tmp_path, old)
    assert planned.get("torch", "").startswith("2.13.0"), planned  # the control: pins replace it
