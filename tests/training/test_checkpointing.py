"""RecipeCheckpointer on its own: manifests, verification, fallback, run ids, pruning, full disk."""

import json
import os
import subprocess

import pytest
import torch

from distillm_tune.training.checkpointing import CheckpointWriteError, RecipeCheckpointer, sha256_of


def _save(ckpt, step, value=0.0):
    sharded = {"model": {"w": torch.full((64,), float(value))}, "optimizer": {"state": {"w": {"m": torch.ones(64)}}}}
    return ckpt.save(step, {"run_id": ckpt.run_id, "global_step": step}, {"rng": torch.get_rng_state()}, sharded)


def _weights(ckpt, path):
    w = {"w": torch.empty(64)}
    ckpt.load_sharded(path, "model", w)
    return w["w"]


def test_manifest_matches_the_files_and_verify_catches_truncation_and_bit_flips(tmp_path):
    ckpt = RecipeCheckpointer(str(tmp_path), keep_last=3)
    ckpt.start_run()
    path = _save(ckpt, 2)
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    assert manifest["run_id"] == ckpt.run_id and manifest["step"] == 2 and manifest["world_size"] == 1
    assert manifest["format"] == 2
    on_disk = sorted(os.path.relpath(os.path.join(r, f), path) for r, _, fs in os.walk(path) for f in fs)
    assert sorted(manifest["files"]) == [f for f in on_disk if f != "manifest.json"]  # every file, DCP's included
    assert {"model/.metadata", "model/__0_0.distcp", "optimizer/.metadata", "recipe_state.pt",
            "rank_00000.pt"} <= set(manifest["files"])
    for name, meta in manifest["files"].items():  # against hashlib directly on the files
        assert meta == {"bytes": os.path.getsize(os.path.join(path, name)), "sha256": sha256_of(os.path.join(path, name))}
    assert ckpt.verify(path) is None

    shard = os.path.join(path, "model", "__0_0.distcp")
    data = open(shard, "rb").read()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(flipped))
    assert "model/__0_0.distcp does not match its sha256" in ckpt.verify(path)
    open(shard, "wb").write(data[:100])
    assert "model/__0_0.distcp has 100 bytes" in ckpt.verify(path)
    open(shard, "wb").write(data)
    assert ckpt.verify(path) is None
    os.remove(os.path.join(path, "optimizer", ".metadata"))
    assert "optimizer/.metadata is missing" in ckpt.verify(path)


def test_a_format_1_checkpoint_is_refused_naming_its_path_and_format(tmp_path):
    ckpt = RecipeCheckpointer(str(tmp_path))
    ckpt.start_run()
    path = _save(ckpt, 2)
    manifest_path = os.path.join(path, "manifest.json")
    manifest = json.load(open(manifest_path))
    json.dump({k: v for k, v in manifest.items() if k != "format"}, open(manifest_path, "w"))
    with pytest.raises(ValueError, match=r"checkpoint '.*step_00000002' is in format 1 .*reads format 2"):
        ckpt.load(path, world_size=1)


def test_corrupt_newest_falls_back_to_the_newest_intact_one_of_the_same_run(tmp_path):
    ckpt = RecipeCheckpointer(str(tmp_path), keep_last=3)
    ckpt.start_run()
    for step in (2, 4, 6):
        _save(ckpt, step, value=step)
    with open(os.path.join(ckpt.root, "step_00000006", "optimizer", "__0_0.distcp"), "r+b") as f:
        f.truncate(10)
    path, skipped = ckpt.find_resumable()
    assert path == os.path.join(ckpt.root, "step_00000004")
    assert [p for p, _ in skipped] == [os.path.join(ckpt.root, "step_00000006")]
    assert torch.equal(_weights(ckpt, path), torch.full((64,), 4.0))  # stored values read back: exact


def test_pruning_keeps_this_runs_newest_and_latest_and_resume_never_takes_another_runs_state(tmp_path):
    """The bug: a shorter second run in a used directory wrote step_10, pruning by name deleted
    it (the first run's step_30/40 sorted after it) and resume fell back to the other run's step_40."""
    first = RecipeCheckpointer(str(tmp_path), keep_last=2)
    first.start_run()
    for step in (10, 20, 30, 40):
        _save(first, step, value=1)
    second = RecipeCheckpointer(str(tmp_path), keep_last=2)
    second.start_run()  # the recipe refuses this directory; the checkpointer must still keep runs apart
    _save(second, 10, value=2)
    names = sorted(os.listdir(second.root))
    assert "step_00000010" in names and open(os.path.join(second.root, "latest")).read() == "step_00000010"
    path, _ = RecipeCheckpointer(str(tmp_path)).find_resumable()
    assert path == os.path.join(second.root, "step_00000010")
    assert torch.equal(_weights(second, path), torch.full((64,), 2.0))  # stored values read back: exact
    # the first run's checkpoints are neither pruned by nor offered to the second run
    assert {"step_00000030", "step_00000040"} <= set(names)


def test_pruning_keeps_keep_last_by_step_number_not_by_name(tmp_path):
    ckpt = RecipeCheckpointer(str(tmp_path), keep_last=2)
    ckpt.start_run()
    for step in (9, 99, 100, 1000):  # names of different width would sort wrongly as text
        _save(ckpt, step)
    assert sorted(d for d in os.listdir(ckpt.root) if d.startswith("step_")) == ["step_00000100", "step_00001000"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 1 MiB file system: a real full disk (tmpfs needs root, which CI and the sessions run as)."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test: {proc.stderr.strip()}")
    yield str(mnt)
    # lazy: the failed torch.save's file may still be open in the kept traceback
    subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_full_disk_fails_naming_the_path_and_free_space_and_leaves_the_previous_checkpoint(small_tmpfs):
    ckpt = RecipeCheckpointer(small_tmpfs, keep_last=3)
    ckpt.start_run()
    first = ckpt.save(1, {}, {}, {"model": {"w": torch.zeros(50_000)}})  # ~200 KB
    files = [os.path.join(r, f) for r, _, fs in os.walk(first) for f in fs]
    before = {f: sha256_of(f) for f in files}
    with pytest.raises(CheckpointWriteError, match=r"could not write checkpoint .*step_00000002.*MiB free.*"
                                                   r"step_00000001' is intact"):
        ckpt.save(2, {}, {}, {"model": {"w": torch.zeros(400_000)}})  # ~1.6 MB: does not fit
    assert sorted(os.listdir(ckpt.root)) == ["latest", "run.json", "step_00000001"]  # no torn .tmp folder
    assert {f: sha256_of(f) for f in files} == before
    assert ckpt.find_resumable()[0] == first
