"""Resume you can trust: multi-process resume, one run per output directory, corrupt checkpoints,
and changed settings.

References: an uninterrupted run with the same settings (losses and exported weights), the files
themselves (sha256 before and after), and the operating system's process table.
"""

import hashlib
import logging
import os
import shutil
import subprocess

import pytest

from conftest import (
    LORA,
    REPO,
    assert_same_losses,
    assert_same_weights,
    hf_weights,
    killer_env,
    last_by_step,
    read_metrics,
    run_recipe,
    subprocess_env,
    tune_cmd,
)

# 2 epochs x 3 steps, a checkpoint every 2 steps; a flat learning rate (cosine down to its own
# value) so that a run extended by an epoch on resume is step for step the longer run.
FLAT_LR = ["optimizer.lr=5e-4", "lr_scheduler.min_lr=5e-4"]
TWO_PROC = ["method=kd", "batch_size=4", "epochs=2", "save_every_n_steps=2", *FLAT_LR]


def _tune(tmp_path, tiny_assets, out, *args, env=None, nproc=2):
    cmd = tune_cmd(f"assets_dir={tiny_assets}", f"output_dir={out}", *TWO_PROC, *args, nproc=nproc)
    return subprocess.run(cmd, cwd=REPO, env=env or subprocess_env(), capture_output=True, text=True, timeout=600)


def _tree_hashes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            if f != ".lock":
                out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


# --------------------------------------------------------------------- 1. two-process resume


@pytest.mark.slow
def test_two_process_run_killed_after_a_save_resumes_to_the_uninterrupted_run(tiny_assets, tmp_path):
    """Before the fix every resumed FSDP run died at its next save (KeyError: 0): the optimizer,
    built before the checkpoint's weights were loaded, held parameters FSDP had replaced. (LoRA's
    two-process kill and resume: test_killed_run_resumes_on_another_number_of_ranks[lora].)"""
    extra = []
    full = _tune(tmp_path, tiny_assets, tmp_path / "full", *extra)
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "killed"
    killed = _tune(tmp_path, tiny_assets, out, *extra, env=killer_env(tmp_path, 4, rank=1))
    assert killed.returncode != 0
    assert open(out / "checkpoints" / "latest").read() == "step_00000004"
    assert not (out / "hf_model").exists()

    resumed = _tune(tmp_path, tiny_assets, out, *extra, "resume_from_checkpoint=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    rows = last_by_step(read_metrics(str(out)))
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    assert_same_losses([rows[s] for s in sorted(rows)], read_metrics(str(tmp_path / "full")), rel=1e-6,
                       keys=("loss", "loss_ce", "lr"))
    assert open(out / "checkpoints" / "latest").read() == "step_00000006"  # saved after the resume
    assert_same_weights(out, tmp_path / "full", rtol=0, atol=1e-6)
    if extra:
        assert (out / "peft_adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("extra", [[], [LORA]], ids=["full", "lora"])
def test_finished_run_resumed_with_more_epochs_is_the_longer_run(tiny_assets, tmp_path, extra, caplog):
    """In this process: extending the epochs is the same on any number of ranks (the two-process
    resume itself: the tests above and below)."""
    args = [*TWO_PROC, "batch_size=8", *extra]
    run_recipe(tiny_assets, str(tmp_path / "longer"), *args)
    out = tmp_path / "extended"
    run_recipe(tiny_assets, str(out), *args, "epochs=1")
    with caplog.at_level(logging.WARNING):
        run_recipe(tiny_assets, str(out), *args, "resume_from_checkpoint=true")  # epochs=2 now
    assert any("changed on resume: epochs 1 -> 2" in r.getMessage() for r in caplog.records)
    rows = last_by_step(read_metrics(str(out)))
    assert_same_losses([rows[s] for s in sorted(rows)], read_metrics(str(tmp_path / "longer")), rel=1e-6,
                       keys=("loss", "lr"))
    assert_same_weights(out, tmp_path / "longer", rtol=0, atol=1e-6)


# ---------------------------------------------- 1b. resume on another number of ranks (DCP)

# The same global micro-batch (8 samples) on 1 and 2 processes; the uninterrupted run is the
# one-process run (equal to the two-process one up to float summation order,
# test_two_processes_give_the_losses_of_one_with_the_same_global_batch).
ON_RANKS = {1: "batch_size=8", 2: "batch_size=4"}
# Measured (full and LoRA, 2->1 and 1->2): max relative loss deviation 1.6e-6, CE 1.5e-7, max abs
# weight deviation 2.4e-6 (docs/resume.md); the bounds are those of 2 processes vs 1 uninterrupted.
LOSS_REL, WEIGHT_ATOL = 1e-5, 1e-5


def _max_rel(rows, ref, key):
    return max(abs(a[key] - b[key]) / max(abs(b[key]), 1e-30) for a, b in zip(rows, ref))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], [LORA]], ids=["full", "lora"])
def test_killed_run_resumes_on_another_number_of_ranks(tiny_assets, tmp_path, extra):
    """SIGKILL after the step-4 checkpoint, then resume 2 -> 1 and 1 -> 2 ranks with the same global
    batch: every step's loss and the final weights are those of the uninterrupted run."""
    _, ref = run_recipe(tiny_assets, str(tmp_path / "ref"), *TWO_PROC, *extra, ON_RANKS[1])
    measured = {}
    for before, after in ((2, 1), (1, 2)):
        out = tmp_path / f"{before}to{after}"
        killed = _tune(tmp_path, tiny_assets, out, *extra, ON_RANKS[before], nproc=before if before > 1 else None,
                       env=killer_env(tmp_path, 4, rank=1 if before > 1 else None))
        assert killed.returncode != 0 and (out / "checkpoints" / "latest").is_file(), killed.stderr[-3000:]
        ckpt = out / "checkpoints" / "step_00000004"
        assert open(out / "checkpoints" / "latest").read() == "step_00000004" and not (out / "hf_model").exists()
        assert sorted(os.listdir(ckpt / "model")) == [".metadata"] + [f"__{r}_0.distcp" for r in range(before)]

        # the per-rank batch size kept: another global batch, refused before any model loads
        if after == 1:
            with pytest.raises(ValueError, match=r"config batch_size: is 4 on 1 rank\(s\) but .*step_00000004' was "
                                                 r"written with 4 on 2 rank\(s\); it cannot change when resuming unless "
                                                 r"the global micro-batch \(batch_size x ranks\) stays 8, it would be 4. "
                                                 r"Set batch_size=8"):
                run_recipe(tiny_assets, str(out), *TWO_PROC, *extra, ON_RANKS[2], "resume_from_checkpoint=true")
        else:
            refused = _tune(tmp_path, tiny_assets, out, *extra, ON_RANKS[1], "resume_from_checkpoint=true")
            assert refused.returncode != 0
            assert "config batch_size: is 8 on 2 rank(s) but" in refused.stderr
            assert "stays 8, it would be 16. Set batch_size=4" in refused.stderr

        if after == 1:
            run_recipe(tiny_assets, str(out), *TWO_PROC, *extra, ON_RANKS[1], "resume_from_checkpoint=true")
        else:
            resumed = _tune(tmp_path, tiny_assets, out, *extra, ON_RANKS[2], "resume_from_checkpoint=true")
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            assert "resumed from" in resumed.stderr + resumed.stdout
        rows = last_by_step(read_metrics(str(out)))
        assert sorted(rows) == [1, 2, 3, 4, 5, 6]
        rows = [rows[s] for s in sorted(rows)]
        assert_same_losses(rows, ref, rel=LOSS_REL, keys=("loss", "loss_ce", "lr"))
        assert_same_weights(out, tmp_path / "ref", rtol=0, atol=WEIGHT_ATOL)
        if extra:
            assert (out / "peft_adapter" / "adapter_config.json").is_file()
        wa, wb = hf_weights(out), hf_weights(tmp_path / "ref")
        measured[f"{before}->{after}"] = (_max_rel(rows, ref, "loss"), _max_rel(rows, ref, "loss_ce"),
                                          max(float((wa[k].float() - wb[k].float()).abs().max()) for k in wb))
    print(f"max relative loss / CE deviation and max abs weight deviation from the uninterrupted run: {measured}")


def test_replay_buffers_are_dealt_to_another_number_of_ranks_in_age_order_and_equal_lengths():
    from distillm_tune.recipes.kd_offpolicy import deal_replay_samples

    two = [[("r0", i) for i in range(5)], [("r1", i) for i in range(5)]]  # two ranks' buffers, oldest first
    one = deal_replay_samples(two, world_size=1, rank=0, capacity=100)
    assert one == [(r, i) for i in range(5) for r in ("r0", "r1")]  # every sample, interleaved by age
    assert deal_replay_samples(two, world_size=1, rank=0, capacity=4) == one[-4:]  # the newest when over capacity
    back = [deal_replay_samples([one], world_size=2, rank=r, capacity=100) for r in (0, 1)]
    assert back == two  # 2 -> 1 -> 2 gives every rank its own samples back
    odd = [deal_replay_samples([one[:7]], world_size=2, rank=r, capacity=100) for r in (0, 1)]
    assert [len(b) for b in odd] == [3, 3] and set(odd[0]).isdisjoint(odd[1])  # equal lengths on every rank
    assert deal_replay_samples([[], []], world_size=1, rank=0, capacity=10) == []


def test_a_save_before_the_first_optimizer_step_changes_nothing_and_resumes_exactly(tiny_assets, tmp_path,
                                                                                      monkeypatch):
    """Step 1 is skipped (a NaN loss), so the optimizer has no state yet when step 1 is saved:
    DCP's state-dict API would initialise it (a zero step), which must neither change the run
    nor the resumed one (AdamW's bias correction counts steps)."""
    from distillm_tune.recipes import kd_offpolicy

    original = kd_offpolicy.KDOffPolicyRecipe._loss_sums

    def loss_sums(self, batch):
        loss, div, ce = original(self, batch)  # (kd_ratio·D + (1−kd_ratio)·CE, D, CE)
        return (loss * float("nan"), div * float("nan"), ce) if self.global_step == 0 else (loss, div, ce)

    monkeypatch.setattr(kd_offpolicy.KDOffPolicyRecipe, "_loss_sums", loss_sums)
    args = ["method=kd", "keep_last_checkpoints=3"]
    _, unsaved = run_recipe(tiny_assets, str(tmp_path / "unsaved"), *args)  # saves only at the end
    out = tmp_path / "saved"
    _, saved = run_recipe(tiny_assets, str(out), *args, "save_every_n_steps=1")
    assert saved[0]["skipped_nonfinite"] == 1.0
    assert [r["step"] for r in saved] == [r["step"] for r in unsaved] == [1, 2, 3]
    assert_same_losses(saved[1:], unsaved[1:], rel=0, keys=("loss", "grad_norm"))  # step 1's loss is the NaN
    assert_same_weights(out, tmp_path / "unsaved", rtol=0, atol=0)
    (out / "checkpoints" / "latest").write_text("step_00000001")
    shutil.rmtree(out / "hf_model")
    _, resumed = run_recipe(tiny_assets, str(out), *args, "save_every_n_steps=1", "resume_from_checkpoint=true")
    assert_same_losses([last_by_step(resumed)[s] for s in (2, 3)], unsaved[1:], rel=0, keys=("loss", "grad_norm"))
    assert_same_weights(out, tmp_path / "unsaved", rtol=0, atol=0)


# --------------------------------------------------------------- 2. one run per output directory


def test_second_run_into_a_used_output_dir_is_refused_and_loses_nothing(tiny_assets, tmp_path):
    run_recipe(tiny_assets, str(tmp_path), "method=kd", "epochs=2", "save_every_n_steps=2")
    before = _tree_hashes(tmp_path)
    with pytest.raises(ValueError, match=r"config output_dir: .* holds an earlier run \(checkpoints/, metrics.jsonl, "
                                         r"hf_model/\): pass resume_from_checkpoint=true .* overwrite=true"):
        run_recipe(tiny_assets, str(tmp_path), "method=kd", "epochs=1", "save_every_n_steps=1")
    assert _tree_hashes(tmp_path) == before


def test_overwrite_replaces_the_earlier_run_and_resume_takes_the_new_runs_state(tiny_assets, tmp_path):
    """The scenario of the bug: a longer run, then a shorter one into the same directory."""
    run_recipe(tiny_assets, str(tmp_path), "method=kd", "epochs=2", "save_every_n_steps=1", "keep_last_checkpoints=2")
    run_recipe(tiny_assets, str(tmp_path / "ref"), "method=kd", "epochs=1", "save_every_n_steps=1", "seed=3")
    recipe, rows = run_recipe(tiny_assets, str(tmp_path), "method=kd", "epochs=1", "save_every_n_steps=1",
                              "seed=3", "overwrite=true")
    ckpt = tmp_path / "checkpoints"
    assert not (tmp_path / ".previous_run").exists()  # the earlier run, set aside, went after step 1
    assert sorted(d for d in os.listdir(ckpt) if d.startswith("step_")) == ["step_00000002", "step_00000003"]
    assert open(ckpt / "latest").read() == "step_00000003"
    assert [r["step"] for r in rows] == [1, 2, 3]  # the earlier run's metrics went with it
    assert_same_losses(rows, read_metrics(str(tmp_path / "ref")), rel=1e-6)
    resumed, _ = run_recipe(tiny_assets, str(tmp_path), "method=kd", "epochs=1", "save_every_n_steps=1", "seed=3",
                            "resume_from_checkpoint=true")
    assert resumed.global_step == 3 and resumed.checkpointer.run_id == recipe.checkpointer.run_id
    assert_same_weights(tmp_path, tmp_path / "ref", rtol=0, atol=0)


def test_a_run_that_never_started_leaves_no_folder_behind(tiny_assets, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="gives no usable example"):
        run_recipe(tiny_assets, str(tmp_path / "new"), "method=kd", f"dataset.source={empty}")
    with pytest.raises(ValueError, match="no checkpoint found"):
        run_recipe(tiny_assets, str(tmp_path / "nothing_to_resume"), "method=kd", "resume_from_checkpoint=true")
    with pytest.raises(ValueError, match="holds non-finite weights"):  # fails while loading, after the claim
        teacher = tmp_path / "teacher"
        shutil.copytree(os.path.join(tiny_assets, "teacher"), teacher)
        from safetensors.torch import load_file, save_file

        sd = load_file(teacher / "model.safetensors")
        next(v for k, v in sd.items() if "attn" in k).view(-1)[0] = float("nan")
        save_file(sd, teacher / "model.safetensors", metadata={"format": "pt"})
        run_recipe(tiny_assets, str(tmp_path / "nan"), "method=kd", f"teacher.checkpoint_dir={teacher}")
    assert sorted(os.listdir(tmp_path)) == ["empty.jsonl", "teacher"]


def test_an_earlier_run_left_set_aside_is_refused_until_put_back(tiny_assets, tmp_path):
    """A run killed between setting the earlier run aside and its first step (nothing else can
    put it back): the next run refuses to go on, saying where the earlier run is."""
    (tmp_path / ".previous_run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"config output_dir: .* holds .previous_run/, an earlier run set aside by an "
                                         r"overwrite=true run that was killed before its first step"):
        run_recipe(tiny_assets, str(tmp_path), "method=kd", "overwrite=true")
    assert sorted(os.listdir(tmp_path)) == [".previous_run"]


def test_a_running_run_locks_its_output_dir(tiny_assets, tmp_path):
    from distillm_tune.training.output_dir import lock_output_dir

    lock = lock_output_dir(str(tmp_path))  # another run holding the directory
    try:
        with pytest.raises(ValueError, match=rf"config output_dir: '{tmp_path}' is in use by another run \(pid {os.getpid()}"):
            run_recipe(tiny_assets, str(tmp_path), "method=kd")
    finally:
        lock.close()
    run_recipe(tiny_assets, str(tmp_path), "method=kd")  # free again once it ends


# ---------------------------------------------------------------------- 3. corrupt checkpoints


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_newest_checkpoint_resumes_from_the_previous_intact_one(tiny_assets, tmp_path, caplog, damage):
    args = ["method=kd", "epochs=2", "save_every_n_steps=2", "keep_last_checkpoints=3"]
    _, full = run_recipe(tiny_assets, str(tmp_path / "full"), *args)
    out = tmp_path / "run"
    run_recipe(tiny_assets, str(out), *args)  # checkpoints at steps 2, 4, 6
    victim = out / "checkpoints" / "step_00000006" / "optimizer" / "__0_0.distcp"  # this rank's optimizer shard
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 3])
    else:  # same size, one byte changed: only the checksum can tell
        victim.write_bytes(data[:1000] + bytes([data[1000] ^ 1]) + data[1001:])
    shutil.rmtree(out / "hf_model")
    with caplog.at_level(logging.WARNING):
        resumed, rows = run_recipe(tiny_assets, str(out), *args, "resume_from_checkpoint=true")
    bad, good = out / "checkpoints" / "step_00000006", out / "checkpoints" / "step_00000004"
    warning = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert len(warning) == 1 and str(bad) in warning[0] and f"resuming from {good}" in warning[0]
    assert (out / "checkpoints" / "corrupt_step_00000006").is_dir()  # kept for inspection, out of the way
    last = last_by_step(rows)
    assert_same_losses([last[5], last[6]], full[4:6], rel=1e-6)
    assert_same_weights(out, tmp_path / "full", rtol=0, atol=1e-6)


def test_no_intact_checkpoint_is_an_error_listing_each_one(tiny_assets, tmp_path):
    run_recipe(tiny_assets, str(tmp_path), "method=kd", "save_every_n_steps=1", "keep_last_checkpoints=1")
    model = tmp_path / "checkpoints" / "step_00000003" / "model" / "__0_0.distcp"
    model.write_bytes(b"")
    with pytest.raises(ValueError, match=r"config resume_from_checkpoint: no intact checkpoint .*step_00000003: "
                                         r"model/__0_0.distcp has 0 bytes"):
        run_recipe(tiny_assets, str(tmp_path), "method=kd", "save_every_n_steps=1", "keep_last_checkpoints=1",
                   "resume_from_checkpoint=true")


# ----------------------------------------------------------------- 4. changed settings on resume


def _two_step_checkpoint(tiny_assets, out):
    """A finished 3-step kd run whose ``latest`` is moved back to its step-2 checkpoint."""
    run_recipe(tiny_assets, str(out), "method=kd", "save_every_n_steps=2", "keep_last_checkpoints=3")
    (out / "checkpoints" / "latest").write_text("step_00000002")


def test_a_new_learning_rate_is_applied_on_resume_and_logged(tiny_assets, tmp_path, caplog):
    _, ref = run_recipe(tiny_assets, str(tmp_path / "ref"), "method=kd", "optimizer.lr=1e-3")
    out = tmp_path / "run"
    _two_step_checkpoint(tiny_assets, out)
    with caplog.at_level(logging.WARNING):
        _, rows = run_recipe(tiny_assets, str(out), "method=kd", "save_every_n_steps=2", "keep_last_checkpoints=3",
                             "optimizer.lr=1e-3", "resume_from_checkpoint=true")
    assert any("changed on resume: optimizer.lr 0.0005 -> 0.001" in r.getMessage() for r in caplog.records)
    # the schedule at step 3 is the one a run started with lr=1e-3 has there (not the saved 5e-4's)
    assert last_by_step(rows)[3]["lr"] == pytest.approx(ref[2]["lr"], rel=1e-12)


@pytest.mark.parametrize("override, key", [
    ("batch_size=4", "batch_size"),
    ("seed=2", "seed"),
    ("loss.temperature=2.0", "loss"),
    ("method=gkd", "method"),
    ("kd_ratio=0.5", "kd_ratio"),
    ("max_seq_len=80", "max_seq_len"),
    ("sgo.temperature=0.5", "sgo"),
    ("student.lora={lora_attn_modules: [q_proj], lora_rank: 2, lora_alpha: 4}", "student.lora"),
])
def test_a_changed_run_defining_setting_is_refused_before_any_model_loads(tiny_assets, tmp_path, monkeypatch,
                                                                           override, key):
    import distillm_tune.recipes.kd_offpolicy as recipe_module

    _two_step_checkpoint(tiny_assets, tmp_path)
    monkeypatch.setattr(recipe_module, "load_hf", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=rf"config {key}: is .* but .*step_00000002' was written with "
                                         r".*cannot change when resuming"):
        run_recipe(tiny_assets, str(tmp_path), "method=kd", "save_every_n_steps=2", "keep_last_checkpoints=3",
                   override, "resume_from_checkpoint=true")


def test_an_operational_setting_may_change_on_resume(tiny_assets, tmp_path, caplog):
    _two_step_checkpoint(tiny_assets, tmp_path)
    with caplog.at_level(logging.WARNING):
        recipe, _ = run_recipe(tiny_assets, str(tmp_path), "method=kd", "save_every_n_steps=1", "keep_last_checkpoints=3",
                               "validation.max_examples=4", "resume_from_checkpoint=true")
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "changed on resume: save_every_n_steps 2 -> 1" in messages
    assert "changed on resume: validation.max_examples 8 -> 4" in messages
    assert recipe.global_step == 3


# Errors that name the file or key (item 5 of the issue), the killed launcher and every other fault
# are probes of the fault-injection suite: tests/faults/test_faults.py (table: docs/reliability.md).
