"""Resume you can trust: multi-process resume, one run per output directory, corrupt checkpoints,
changed settings, errors that name the file, and workers that die with their launcher.

References: an uninterrupted run with the same settings (losses and exported weights), the files
themselves (sha256 before and after), and the operating system's process table.
"""

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import (
    LORA,
    REPO,
    assert_same_losses,
    assert_same_weights,
    killer_env,
    last_by_step,
    make_cfg,
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
@pytest.mark.parametrize("extra", [[], [LORA]], ids=["full", "lora"])
def test_two_process_run_killed_after_a_save_resumes_to_the_uninterrupted_run(tiny_assets, tmp_path, extra):
    """Before the fix every resumed FSDP run died at its next save (KeyError: 0): the optimizer,
    built before the checkpoint's weights were loaded, held parameters FSDP had replaced."""
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


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], [LORA]], ids=["full", "lora"])
def test_finished_two_process_run_resumed_with_more_epochs_is_the_longer_run(tiny_assets, tmp_path, extra):
    longer = _tune(tmp_path, tiny_assets, tmp_path / "longer", *extra)
    assert longer.returncode == 0, longer.stderr[-3000:]
    out = tmp_path / "extended"
    first = _tune(tmp_path, tiny_assets, out, *extra, "epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    extended = _tune(tmp_path, tiny_assets, out, *extra, "resume_from_checkpoint=true")  # epochs=2 now
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "changed on resume: epochs 1 -> 2" in extended.stderr + extended.stdout
    rows = last_by_step(read_metrics(str(out)))
    assert_same_losses([rows[s] for s in sorted(rows)], read_metrics(str(tmp_path / "longer")), rel=1e-6,
                       keys=("loss", "lr"))
    assert_same_weights(out, tmp_path / "longer", rtol=0, atol=1e-6)


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
    assert sorted(d for d in os.listdir(ckpt) if d.startswith("step_")) == ["step_00000002", "step_00000003"]
    assert open(ckpt / "latest").read() == "step_00000003"
    assert [r["step"] for r in rows] == [1, 2, 3]  # the earlier run's metrics went with it
    assert_same_losses(rows, read_metrics(str(tmp_path / "ref")), rel=1e-6)
    resumed, _ = run_recipe(tiny_assets, str(tmp_path), "method=kd", "epochs=1", "save_every_n_steps=1", "seed=3",
                            "resume_from_checkpoint=true")
    assert resumed.global_step == 3 and resumed.checkpointer.run_id == recipe.checkpointer.run_id
    assert_same_weights(tmp_path, tmp_path / "ref", rtol=0, atol=0)


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
    victim = out / "checkpoints" / "step_00000006" / "optimizer.pt"
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
    model = tmp_path / "checkpoints" / "step_00000003" / "model.pt"
    model.write_bytes(b"")
    with pytest.raises(ValueError, match=r"config resume_from_checkpoint: no intact checkpoint .*step_00000003: "
                                         r"model.pt has 0 bytes"):
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
    (f"student.lora={{lora_attn_modules: [q_proj], lora_rank: 2, lora_alpha: 4}}", "student.lora"),
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


# ------------------------------------------------------------- 5. errors that name the file/key


def _copy_checkpoint(src, dst):
    shutil.copytree(src, dst)
    return dst


def _truncate_weights(d):
    p = os.path.join(d, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])


def _rewrite_config(d, text):
    open(os.path.join(d, "config.json"), "w").write(text)


def _drop_config_key(key):
    def edit(d):
        import json

        cfg = json.load(open(os.path.join(d, "config.json")))
        cfg.pop(key)
        _rewrite_config(d, json.dumps(cfg))
    return edit


@pytest.mark.parametrize("who", ["student", "teacher"])
@pytest.mark.parametrize("damage, match", [
    (_truncate_weights, r"cannot read weight file '.*/model.safetensors' \(\d+ bytes\)"),
    (lambda d: _rewrite_config(d, '{"model_type": "gpt2",\n "n_layer": }'),
     r"config.json is not valid JSON: Expecting value at line 2 column 13"),
    (_drop_config_key("model_type"), r"config.json has no 'model_type'"),
    (_drop_config_key("n_layer"), r"config.json has no 'n_layer', which a gpt2 checkpoint needs"),
], ids=["truncated_safetensors", "config_not_json", "no_model_type", "no_n_layer"])
def test_a_broken_checkpoint_is_reported_with_its_file_and_key(tiny_assets, tmp_path, who, damage, match):
    bad = _copy_checkpoint(os.path.join(tiny_assets, who), str(tmp_path / who))
    damage(bad)
    with pytest.raises(ValueError, match=rf"config {who}.checkpoint_dir: .*{match}"):
        run_recipe(tiny_assets, str(tmp_path / "out"), "method=kd", f"{who}.checkpoint_dir={bad}")


def test_non_utf8_data_names_the_file_and_line(tiny_assets, tmp_path):
    lines = open(os.path.join(tiny_assets, "data", "train.jsonl"), "rb").read().splitlines(keepends=True)
    bad = tmp_path / "train.jsonl"
    bad.write_bytes(b"".join(lines[:4]) + lines[4].replace(b'"', b'"\xff', 1) + b"".join(lines[5:]))
    with pytest.raises(ValueError, match=rf"config dataset: {bad}:5: not UTF-8 text at byte \d+ of the line"):
        run_recipe(tiny_assets, str(tmp_path / "out"), "method=kd", f"dataset.source={bad}")


@pytest.mark.parametrize("rows, extra", [
    (0, []),
    (8, ["dataset.max_prompt_len=1"]),  # every prompt is longer than 1 token: all rows dropped
], ids=["empty", "fully_filtered"])
def test_training_data_that_gives_no_example_is_blamed_on_the_data(tiny_assets, tmp_path, rows, extra):
    lines = open(os.path.join(tiny_assets, "data", "train.jsonl")).readlines()[:rows]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"config dataset.source: '{data}' gives no usable example \(read {rows} rows, kept 0"):
        run_recipe(tiny_assets, str(tmp_path / "out"), "method=kd", f"dataset.source={data}", *extra)


@pytest.mark.parametrize("override, message", [
    ("batch_size=abc", "config batch_size: expected an integer >= 1, got 'abc'"),
    ("batch_size=0", "config batch_size: expected an integer >= 1, got 0"),
    ("epochs=0", "config epochs: expected an integer >= 1, got 0"),
    ("gradient_accumulation_steps=0", "config gradient_accumulation_steps: expected an integer >= 1 or null, got 0"),
    ("validation.batch_size=0", "config validation.batch_size: expected an integer >= 1 or null, got 0"),
    ("sgo.num_stages=0", "config sgo.num_stages: expected an integer >= 1 or null, got 0"),
    ("sgo.top_p=0", "config sgo.top_p: expected a number in (0, 1] or null, got 0"),
    ("sgo.buffer_size=-1", "config sgo.buffer_size: expected an integer >= 1 or null, got -1"),
    ("sgo.replay_ratio=sometimes", "config sgo.replay_ratio: expected one of ['decreasing', 'constant', 'increasing']"),
    ("sgo.temperature=-1", "config sgo.temperature: expected a number >= 0 or null, got -1"),
    ("save_every_n_steps=0", "config save_every_n_steps: expected an integer >= 1 or null, got 0"),
    ("keep_last_checkpoints=0", "config keep_last_checkpoints: expected an integer >= 1 or null, got 0"),
    ("resume_from_checkpoint=maybe", "config resume_from_checkpoint: expected true or false"),
    ("max_prompt_len=96", "config max_prompt_len: must be below max_seq_len=96, got 96"),
])
def test_bad_values_fail_when_the_recipe_is_built_naming_the_key(tiny_assets, tmp_path, override, message):
    """With method=kd and phi0=0 the sgo.* values are first used after an epoch; they must fail now."""
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        KDOffPolicyRecipe(make_cfg(tiny_assets, str(tmp_path), "method=kd", override))
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------ 6. workers die with their launcher


def _children(pid):
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid):
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_killing_the_launcher_stops_its_workers(tiny_assets, tmp_path):
    out = tmp_path / "run"
    cmd = tune_cmd(f"assets_dir={tiny_assets}", f"output_dir={out}", "method=kd", "batch_size=4", "epochs=200",
                   nproc=2)
    launcher = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)
    workers = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.isfile(out / "metrics.jsonl") and read_metrics(str(out))):
            time.sleep(0.5)
        assert read_metrics(str(out)), "the run did not start training"
        workers = _children(launcher.pid)
        assert len(workers) >= 2 and all(_alive(w) for w in workers)
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        t0 = time.time()
        while time.time() - t0 < 15 and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers still running 15 s after the launcher was killed"
        steps = len(read_metrics(str(out)))
        time.sleep(2)
        assert len(read_metrics(str(out))) == steps  # nothing writes into the output dir any more
    finally:
        for pid in workers + [launcher.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
