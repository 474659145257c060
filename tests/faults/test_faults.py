"""Fault injection: the ways a user or the machine breaks a kd_offpolicy run, and what happens.

Each probe is one fault (a bad value, a broken file, bad data, a reused or full output directory,
NaN, a diverging run, a signal, a killed process) and the behaviour it must produce: the exit code,
a message naming the key or file, whether it fails before any model is loaded, and that nothing
earlier is lost (the files of an earlier run or checkpoint are byte-identical afterwards).

Probes run in this process through the recipe (the exit code is the one ``tune run`` gives for the
exception: 1), except the signal and process probes, which run ``tune run`` itself. The table in
docs/reliability.md is this suite's output: ``RELIABILITY_TABLE=docs/reliability.md python -m
pytest tests/faults`` writes it, and the last test checks that the committed one matches what the
suite measured (all columns but the message excerpt and the time).
"""

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import pytest

_spec = importlib.util.spec_from_file_location(
    "recipe_test_helpers", os.path.join(os.path.dirname(__file__), "..", "recipes", "conftest.py"))
h = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(h)

TABLE = os.path.join(h.REPO, "docs", "reliability.md")
RESULTS = {}  # probe id -> table row


@dataclass
class Ctx:
    assets: str
    tmp: str
    out: str
    earlier: str  # a finished 3-step run (checkpoints at steps 2 and 3, hf_model) to copy from


@dataclass
class Probe:
    id: str
    fault: str
    expect: str  # regex the message (error, or warning for rc 0) must match
    args: tuple = ()  # recipe overrides
    prepare: Optional[Callable[[Ctx], List[str]]] = None  # writes files, returns more overrides
    patch: Optional[Callable] = None  # (monkeypatch, ctx): a fault injected while the run goes
    rc: int = 1
    before_load: Optional[bool] = True  # None: the run trains before the fault shows
    earlier_run: bool = False  # the output dir holds an earlier run whose files must survive
    process: Optional[Callable[[Ctx], tuple]] = None  # runs `tune run` itself: -> (rc, message)
    slow: bool = False
    outcome: str = "error"  # error (refused, nothing done) | stop (stops itself) | recovery | warning


# ------------------------------------------------------------------------------ file helpers


def _copy(ctx, who):
    dst = os.path.join(ctx.tmp, who)
    shutil.copytree(os.path.join(ctx.assets, who), dst)
    return dst


def _broken_checkpoint(who, damage):
    def prepare(ctx):
        d = _copy(ctx, who)
        damage(d)
        return [f"{who}.checkpoint_dir={d}"]
    return prepare


def _truncate(d):
    p = os.path.join(d, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])


def _edit_config(edit):
    def damage(d):
        p = os.path.join(d, "config.json")
        cfg = json.load(open(p))
        edit(cfg)
        json.dump(cfg, open(p, "w"))
    return damage


def _nan_weight(d, value=float("nan")):
    from safetensors.torch import load_file, save_file

    p = os.path.join(d, "model.safetensors")
    sd = load_file(p)
    next(v for k, v in sd.items() if "attn" in k).view(-1)[0] = value
    save_file(sd, p, metadata={"format": "pt"})


def _swap_token_ids(d):  # same vocabulary size, same merges, ids of "a" and "e" exchanged
    p = os.path.join(d, "tokenizer.json")
    tok = json.load(open(p))
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["e"] = vocab["e"], vocab["a"]
    json.dump(tok, open(p, "w"))


def _data(split, transform, key="dataset.source"):
    """A copy of the tiny data split passed through ``transform(lines) -> lines``."""
    def prepare(ctx):
        lines = open(os.path.join(ctx.assets, "data", f"{split}.jsonl"), "rb").read().splitlines(keepends=True)
        p = os.path.join(ctx.tmp, f"{split}.jsonl")
        open(p, "wb").write(b"".join(transform(lines)))
        return [f"{key}={p}"]
    return prepare


def _long_rows(lines, share):
    """Rows whose context makes the prompt longer than the tiny config's 64-token prompt budget."""
    out = []
    for i, line in enumerate(lines):
        if i < share * len(lines):
            row = json.loads(line)
            row["context"] = " ".join([row["context"]] * 20)
            line = (json.dumps(row) + "\n").encode()
        out.append(line)
    return out


def _earlier_checkpoint_damaged(ctx):
    p = os.path.join(ctx.out, "checkpoints", "step_00000003", "optimizer", "__0_0.distcp")  # the optimizer's shard
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    return []


def _hold_lock(ctx):
    from distillm_tune.training.output_dir import lock_output_dir

    _hold_lock.held = lock_output_dir(ctx.out)  # released when the probe's process state is torn down
    return []


def _file_as_output_dir(ctx):
    os.makedirs(os.path.dirname(ctx.out), exist_ok=True)
    open(ctx.out, "w").write("not a directory")
    return []


def _tmpfs_output_dir(ctx, size="2500k"):
    os.makedirs(ctx.out, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", ctx.out], check=True)
    _tmpfs_output_dir.mounted = ctx.out
    return ["save_every_n_steps=1"]


# ---------------------------------------------------------------------------- runtime faults


def _teacher_nan_from_step(step):
    """The teacher's forward returns NaN from ``step`` on (its weights are finite)."""
    def patch(monkeypatch, ctx):
        from distillm_tune.recipes import kd_offpolicy

        original = kd_offpolicy.KDOffPolicyRecipe._loss_sums

        def loss_sums(self, batch):
            if self.global_step + 1 >= step and not getattr(self.teacher, "_nan_hook", False):
                self.teacher.register_forward_hook(lambda m, i, o: [x * float("nan") for x in o]
                                                   if isinstance(o, list) else o * float("nan"))
                self.teacher._nan_hook = True
            return original(self, batch)
        monkeypatch.setattr(kd_offpolicy.KDOffPolicyRecipe, "_loss_sums", loss_sums)
    return patch


def _one_nan_loss_at(step):
    def patch(monkeypatch, ctx):
        from distillm_tune.recipes import kd_offpolicy

        original = kd_offpolicy.KDOffPolicyRecipe._loss_sums

        def loss_sums(self, batch):
            loss, div, ce = original(self, batch)  # (kd_ratio·D + (1−kd_ratio)·CE, D, CE)
            return (loss * float("nan"), div * float("nan"), ce) if self.global_step + 1 == step else (loss, div, ce)
        monkeypatch.setattr(kd_offpolicy.KDOffPolicyRecipe, "_loss_sums", loss_sums)
    return patch


def _val_losses(*values):
    def patch(monkeypatch, ctx):
        from distillm_tune.recipes import kd_offpolicy

        seq = iter(values)
        monkeypatch.setattr(kd_offpolicy.KDOffPolicyRecipe, "validation_loss", lambda self: next(seq))
    return patch


def _fill_disk_after_last_checkpoint(monkeypatch, ctx):
    """The disk fills up between the run's final checkpoint and its export."""
    from distillm_tune.recipes import kd_offpolicy

    original = kd_offpolicy.KDOffPolicyRecipe.save_checkpoint

    def save_checkpoint(self):
        path = original(self)
        if self.global_step == self.total_steps:
            free = shutil.disk_usage(ctx.out).free
            with open(os.path.join(ctx.out, "filler"), "wb") as f:
                f.write(b"\0" * max(0, free - 64 * 1024))
        return path
    monkeypatch.setattr(kd_offpolicy.KDOffPolicyRecipe, "save_checkpoint", save_checkpoint)


def _earlier_run_on_tmpfs(ctx):
    _tmpfs_output_dir(ctx, size="8m")
    shutil.copytree(ctx.earlier, ctx.out, dirs_exist_ok=True)
    return ["resume_from_checkpoint=true", "epochs=2", "keep_last_checkpoints=3"]


# ---------------------------------------------------------------------------- process probes


NAN_ON_RANK_1 = r'''
import os
if os.environ.get("RANK") == "1":
    from distillm_tune.losses import ForwardKLLoss
    original, calls = ForwardKLLoss.sum_and_count, []
    def sum_and_count(self, *a, **k):
        calls.append(1)
        value, count = original(self, *a, **k)
        return (value * float("nan") if len(calls) == 2 else value), count
    ForwardKLLoss.sum_and_count = sum_and_count
'''


def _nan_on_one_rank(ctx):
    """Rank 1 alone sees a NaN divergence at step 2: both ranks must stop in that step."""
    hook = os.path.join(ctx.tmp, "nan_hook")
    os.makedirs(hook)
    open(os.path.join(hook, "sitecustomize.py"), "w").write(NAN_ON_RANK_1)
    env = h.subprocess_env()
    env["PYTHONPATH"] = hook + os.pathsep + env["PYTHONPATH"]
    cmd = h.tune_cmd(f"assets_dir={ctx.assets}", f"output_dir={ctx.out}", "method=kd", "batch_size=4",
                     "guards.on_nonfinite=stop", nproc=2)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=h.REPO, env=env, capture_output=True, text=True, timeout=300)
    stopped = sorted({line.split("]")[0] + "]" for line in proc.stderr.splitlines()
                      if line.startswith("[rank") and "RunStopped: step 2" in line})
    return proc.returncode, (f"{' and '.join(stopped) or 'no rank'} raised RunStopped in step 2, launcher exited "
                             f"after {time.time() - t0:.0f} s: " + next(
                                 (line.split(": ", 1)[1] for line in proc.stderr.splitlines() if "RunStopped: step 2" in line), ""))



def _default_sigint():
    """The run gets Ctrl-C as from a terminal: a suite started in the background of a shell without
    job control inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _signal_then_resume(signal_name, phase, step):
    """`tune run` interrupted by a signal, then `resume_from_checkpoint=true`: both exit codes."""
    def run(ctx):
        args = [f"assets_dir={ctx.assets}", f"output_dir={ctx.out}", "method=kd", "epochs=2", "save_every_n_steps=2"]
        first = subprocess.run(h.tune_cmd(*args), cwd=h.REPO, capture_output=True, text=True, timeout=600,
                               env=h.killer_env(ctx.tmp, step, phase, signal_name=signal_name),
                               preexec_fn=_default_sigint)
        again = subprocess.run(h.tune_cmd(*args, "resume_from_checkpoint=true"), cwd=h.REPO, env=h.subprocess_env(),
                               capture_output=True, text=True, timeout=600)
        rows = h.last_by_step(h.read_metrics(ctx.out))
        ok = again.returncode == 0 and sorted(rows) == list(range(1, 7)) and os.path.isdir(os.path.join(ctx.out, "hf_model"))
        resumed = [line for line in (again.stderr + again.stdout).splitlines() if "resumed from" in line]
        return (first.returncode, again.returncode), (resumed[-1].strip() if resumed else again.stderr[-500:]) + (
            "; all 6 steps logged, hf_model exported" if ok else "; INCOMPLETE")
    return run


def _proc_children(pid):
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
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _rank_of(pid):
    try:
        env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
        return None
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


def _two_process_training(ctx):
    """A long 2-process run, once it has logged its first step: (launcher, worker pids)."""
    cmd = h.tune_cmd(f"assets_dir={ctx.assets}", f"output_dir={ctx.out}", "method=kd", "batch_size=4", "epochs=200",
                     nproc=2)
    launcher = subprocess.Popen(cmd, cwd=h.REPO, env=h.subprocess_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.isfile(os.path.join(ctx.out, "metrics.jsonl"))
                                          and h.read_metrics(ctx.out)):
        time.sleep(0.3)
    return launcher, _proc_children(launcher.pid)


def _processes_with_open_files_under(folder):
    """Pids of live processes holding a file under ``folder`` open (what could still write there)."""
    folder, pids = os.path.realpath(folder) + os.sep, []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}").startswith(folder) for fd in fds) and _alive(int(entry)):
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _kill_all(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _kill_one_rank(ctx):
    launcher, workers = _two_process_training(ctx)
    try:
        victim = next(w for w in workers if _rank_of(w) == 1)
        os.kill(victim, signal.SIGKILL)
        t0 = time.time()
        output, _ = launcher.communicate(timeout=120)
        waited = time.time() - t0
        others = [w for w in workers if w != victim and _alive(w)]
        failure = [line.strip() for line in output.splitlines() if "exitcode" in line or "rank" in line.lower()]
        return launcher.returncode, (f"launcher exited {waited:.0f} s after the kill, {len(others)} worker(s) left; "
                                     + " | ".join(failure[-3:]))
    finally:
        _kill_all(workers + [launcher.pid])


def _kill_launcher(ctx):
    launcher, workers = _two_process_training(ctx)
    try:
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        t0 = time.time()
        while time.time() - t0 < 15 and any(_alive(w) for w in workers):
            time.sleep(0.2)
        left, waited = [w for w in workers if _alive(w)], time.time() - t0
        writers = _processes_with_open_files_under(ctx.out)
        return -9, (f"{len(workers)} workers, {len(left)} alive {waited:.0f} s after the launcher was killed; "
                    f"output dir {f'still open in pids {writers}' if writers else 'no longer written'}")
    finally:
        _kill_all(workers + [launcher.pid])


# ---------------------------------------------------------------------------------- probes

P = Probe
PROBES = [
    # misspelt or unsupported keys
    P("typo_key", "misspelt key `methd=kd`", r"config methd: unknown key; did you mean method\?", ("methd=kd",)),
    P("typo_nested_key", "misspelt nested key `sgo.phi_0=0.5`", r"config sgo.phi_0: unknown key; did you mean sgo.scheduler.phi0\?",
      ("sgo.phi_0=0.5",)),
    P("typo_batch_size", "misspelt key `batch_sise=4`", r"config batch_sise: unknown key; did you mean batch_size\?",
      ("batch_sise=4",)),
    P("typo_validation_key", "misspelt key `validation.max_example=4`",
      r"config validation.max_example: unknown key; did you mean validation.max_examples\?", ("validation.max_example=4",)),
    P("torchtune_optimizer_in_bwd", "torchtune key the recipe does not implement, `optimizer_in_bwd=true`",
      r"config optimizer_in_bwd: torchtune's 'optimizer_in_bwd' is not supported by this recipe yet",
      ("optimizer_in_bwd=true",)),
    P("typo_component_arg", "misspelt component argument `optimizer.lrr=1e-3`",
      r"config optimizer.lrr: torch.optim.AdamW takes no argument 'lrr'; did you mean optimizer.lr\?", ("optimizer.lrr=1e-3",)),
    P("typo_scheduler_arg", "misspelt component argument `sgo.scheduler.phi_0=0.5`",
      r"config sgo.scheduler.phi_0: .*AdaptiveSGOScheduler takes no argument 'phi_0'; did you mean sgo.scheduler.phi0\?",
      ("sgo.scheduler.phi_0=0.5",)),
    P("typo_profiler_arg", "misspelt `profiler.enabld=true`",
      r"config profiler.enabld: .*setup_torch_profiler takes no argument 'enabld'; did you mean profiler.enabled\?",
      ("profiler.enabld=true",)),
    P("bad_component_path", "`optimizer._component_=torch.optim.AdamWW`",
      r"config optimizer._component_: cannot import 'torch.optim.AdamWW'", ("optimizer._component_=torch.optim.AdamWW",)),
    P("loss_not_a_divergence", "`loss._component_=torchtune.modules.loss.CEWithChunkedOutputLoss`",
      r"config loss._component_: .*is not a teacher-student divergence",
      ("method=kd", "loss._component_=torchtune.modules.loss.CEWithChunkedOutputLoss")),
    # bad values
    P("batch_size_text", "`batch_size=abc`", r"config batch_size: expected an integer >= 1, got 'abc'", ("batch_size=abc",)),
    P("batch_size_zero", "`batch_size=0`", r"config batch_size: expected an integer >= 1, got 0", ("batch_size=0",)),
    P("epochs_zero", "`epochs=0`", r"config epochs: expected an integer >= 1, got 0", ("epochs=0",)),
    P("grad_accum_zero", "`gradient_accumulation_steps=0`", r"config gradient_accumulation_steps: expected an integer >= 1",
      ("gradient_accumulation_steps=0",)),
    P("valid_batch_zero", "`validation.batch_size=0` with kd (first used after an epoch)",
      r"config validation.batch_size: expected an integer >= 1", ("method=kd", "validation.batch_size=0")),
    P("top_p_zero", "`sgo.top_p=0` with phi0=0 (first used much later)", r"config sgo.top_p: expected a number in \(0, 1\]",
      ("sgo.top_p=0",)),
    P("temperature_negative", "`sgo.temperature=-1`", r"config sgo.temperature: expected a number >= 0", ("sgo.temperature=-1",)),
    P("buffer_capacity_zero", "`sgo.replay_buffer.capacity=0`", r"config sgo.replay_buffer.capacity: expected an integer >= 1", ("sgo.replay_buffer.capacity=0",)),
    P("phi0_above_one", "`sgo.scheduler.phi0=1.5`", r"config sgo.scheduler.phi0: expected a number in \[0, 1\]", ("sgo.scheduler.phi0=1.5",)),
    P("lr_negative", "`optimizer.lr=-1`", r"config optimizer.lr: Invalid learning rate: -1", ("optimizer.lr=-1",)),
    P("alpha_negative", "`loss.alpha=-0.1` (SRKL)", r"config loss: .*alpha must lie in \[0, 1\)",
      ("method=distillm", "loss.alpha=-0.1")),
    P("kd_ratio_above_one", "`kd_ratio=1.5`", r"config kd_ratio: expected a number in \[0, 1\]", ("kd_ratio=1.5",)),
    P("alpha_out_of_range", "`loss.alpha=1.5` (SRKL)", r"config loss: .*alpha must lie in \[0, 1\)",
      ("method=distillm", "loss.alpha=1.5")),
    P("unknown_method", "`method=minillm`", r"config method: expected one of \['sft', .*\], got 'minillm'", ("method=minillm",)),
    P("compile_not_bool", "`compile=sometimes`", r"config compile: expected true or false, got 'sometimes'", ("compile=sometimes",)),
    P("lora_rank_zero", "`student.lora={lora_rank: 0}`", r"config student.lora.lora_rank: expected an integer >= 1, got 0",
      ("student.lora={lora_rank: 0}",)),
    P("top_k_zero", "`sgo.top_k=0`", r"config sgo.top_k: expected an integer >= 1 or null, got 0", ("sgo.top_k=0",)),
    P("tolerance_negative", "`sgo.scheduler.tolerance=-0.1`", r"config sgo.scheduler.tolerance: expected a number >= 0",
      ("sgo.scheduler.tolerance=-0.1",)),
    P("num_stages_zero", "`sgo.scheduler.num_stages=0`", r"config sgo.scheduler.num_stages: expected an integer >= 1",
      ("sgo.scheduler.num_stages=0",)),
    P("replay_ratio_bad", "`sgo.scheduler.replay_ratio=cosine`",
      r"config sgo.scheduler.replay_ratio: expected one of \['decreasing', 'constant', 'increasing'\]",
      ("sgo.scheduler.replay_ratio=cosine",)),
    P("max_seq_len_text", "`max_seq_len=long`", r"config max_seq_len: expected an integer >= 2, got 'long'", ("max_seq_len=long",)),
    P("prompt_not_below_seq", "`max_prompt_len=96` with max_seq_len=96", r"config max_prompt_len: must be below max_seq_len=96",
      ("max_prompt_len=96",)),
    P("bad_dtype", "`dtype=fp8`", r"config dtype: expected one of \['fp32', 'bf16'\]", ("dtype=fp8",)),
    P("bad_guard", "`guards.on_nonfinite=ignore`", r"config guards.on_nonfinite: expected one of \['skip', 'stop'\]",
      ("guards.on_nonfinite=ignore",)),
    P("keep_last_zero", "`keep_last_checkpoints=0`", r"config keep_last_checkpoints: expected an integer >= 1",
      ("keep_last_checkpoints=0",)),
    # paths
    P("student_missing", "student directory does not exist", r"config student.checkpoint_dir: .*does not exist",
      ("student.checkpoint_dir=/nonexistent/student",)),
    P("teacher_missing", "teacher directory does not exist", r"config teacher.checkpoint_dir: .*does not exist",
      ("teacher.checkpoint_dir=/nonexistent/teacher",)),
    P("data_missing", "training file does not exist", r"config dataset.source: '/nonexistent.jsonl' does not exist",
      ("dataset.source=/nonexistent.jsonl",)),
    P("data_is_directory", "a directory given as the training file", r"config dataset.source: '.*' is a directory",
      prepare=lambda ctx: [f"dataset.source={ctx.tmp}"]),
    P("output_dir_is_file", "output_dir is a file", r"config output_dir: '.*' exists and is not a directory",
      prepare=_file_as_output_dir),
    # broken checkpoints
    P("student_truncated", "student model.safetensors truncated",
      r"config student.checkpoint_dir: cannot read weight file '.*/student/model.safetensors' \(\d+ bytes\)",
      prepare=_broken_checkpoint("student", _truncate), before_load=False),
    P("teacher_truncated", "teacher model.safetensors truncated",
      r"config teacher.checkpoint_dir: cannot read weight file '.*/teacher/model.safetensors' \(\d+ bytes\)",
      prepare=_broken_checkpoint("teacher", _truncate), before_load=False),
    P("config_not_json", "student config.json is not JSON",
      r"config student.checkpoint_dir: .*/config.json is not valid JSON: .* at line 1 column \d+",
      prepare=_broken_checkpoint("student", lambda d: open(os.path.join(d, "config.json"), "w").write("{model_type"))),
    P("config_no_model_type", "teacher config.json without model_type",
      r"config teacher.checkpoint_dir: .*/config.json has no 'model_type'",
      prepare=_broken_checkpoint("teacher", _edit_config(lambda c: c.pop("model_type")))),
    P("config_no_n_layer", "student config.json without n_layer",
      r"config student.checkpoint_dir: .*/config.json has no 'n_layer', which a gpt2 checkpoint needs",
      prepare=_broken_checkpoint("student", _edit_config(lambda c: c.pop("n_layer"))), before_load=False),
    P("teacher_nan_weights", "teacher checkpoint with a NaN weight",
      r"config teacher.checkpoint_dir: '.*' holds non-finite weights in 1 tensors",
      prepare=_broken_checkpoint("teacher", _nan_weight), before_load=False),
    P("teacher_inf_weights", "teacher checkpoint with an inf weight",
      r"config teacher.checkpoint_dir: '.*' holds non-finite weights in 1 tensors",
      prepare=_broken_checkpoint("teacher", lambda d: _nan_weight(d, float("inf"))), before_load=False),
    P("teacher_swapped_ids", "teacher tokenizer with two ids swapped (a <-> e), same size and merges",
      r"config teacher.checkpoint_dir: the teacher's tokenizer .* differs .*token id \d+ is '[ae]' for the teacher",
      prepare=_broken_checkpoint("teacher", _swap_token_ids)),
    # data
    P("train_empty", "empty training file", r"config dataset.source: '.*' gives no usable example \(read 0 rows",
      prepare=_data("train", lambda lines: [])),
    P("valid_empty", "empty validation file (would validate to 0.0 and drive the scheduler)",
      r"config validation.dataset.source: '.*' gives no usable example \(read 0 rows",
      prepare=_data("valid", lambda lines: [], key="validation.dataset.source")),
    P("valid_all_too_long", "every validation row longer than the budget",
      r"config validation.dataset.source: '.*' gives no usable example \(read (\d+) rows, kept 0 \(dropped_long_prompt=\1\)",
      prepare=_data("valid", lambda lines: _long_rows(lines, 1.0), key="validation.dataset.source")),
    P("train_all_too_long", "every training row longer than the budget (fully filtered)",
      r"config dataset.source: '.*' gives no usable example \(read 96 rows, kept 0 \(dropped_long_prompt=96\)",
      prepare=_data("train", lambda lines: _long_rows(lines, 1.0))),
    P("train_mostly_too_long", "60% of the training rows longer than the budget",
      r"config dataset.source: '.*' keeps 38 of 96 rows .*more than guards.max_dropped_fraction=0.5 were dropped",
      prepare=_data("train", lambda lines: _long_rows(lines, 0.6))),
    P("malformed_row", "a training row that is not JSON", r"config dataset: .*train.jsonl:3: not valid JSON",
      prepare=_data("train", lambda lines: lines[:2] + [b"{not json\n"] + lines[3:])),
    P("non_utf8_row", "a training row that is not UTF-8", r"config dataset: .*train.jsonl:5: not UTF-8 text at byte \d+",
      prepare=_data("train", lambda lines: lines[:4] + [lines[4].replace(b'"', b'"\xff', 1)] + lines[5:])),
    P("duplicate_heavy", "half of the training rows are one row repeated (warning, the run goes on)",
      r"dataset.source: 4\d of 96 samples of '.*' are exact duplicates",
      prepare=_data("train", lambda lines: lines[:1] * 48 + lines[48:]), rc=0, before_load=None, outcome="warning"),
    # output directory and resume
    P("output_dir_reused", "a new run into an output_dir holding an earlier run",
      r"config output_dir: .* holds an earlier run \(checkpoints/, metrics.jsonl, hf_model/\)", earlier_run=True),
    P("output_dir_locked", "a second run while one is running in the same output_dir",
      r"config output_dir: '.*' is in use by another run \(pid \d+", prepare=_hold_lock),
    P("output_dir_overwrite_bad_row", "`overwrite=true` over an earlier run, a training row that is not JSON",
      r"config dataset: .*train.jsonl:3: not valid JSON", ("overwrite=true",),
      prepare=_data("train", lambda lines: lines[:2] + [b"{not json\n"] + lines[3:]), earlier_run=True),
    P("output_dir_overwrite_empty_train", "`overwrite=true` over an earlier run, an empty training file",
      r"config dataset.source: '.*' gives no usable example \(read 0 rows", ("overwrite=true",),
      prepare=_data("train", lambda lines: []), earlier_run=True),
    P("output_dir_overwrite_bad_alpha", "`overwrite=true` over an earlier run, `loss.alpha=-0.1` (SRKL)",
      r"config loss: .*alpha must lie in \[0, 1\)", ("overwrite=true", "method=distillm", "loss.alpha=-0.1"),
      earlier_run=True),
    P("output_dir_overwrite_bad_lr", "`overwrite=true` over an earlier run, `optimizer.lr=-1`",
      r"config optimizer.lr: Invalid learning rate: -1", ("overwrite=true", "optimizer.lr=-1"), earlier_run=True),
    P("output_dir_overwrite_swapped_ids", "`overwrite=true` over an earlier run, a teacher tokenizer with two ids swapped",
      r"config teacher.checkpoint_dir: the teacher's tokenizer .* differs .*token id \d+ is '[ae]' for the teacher",
      ("overwrite=true",), prepare=_broken_checkpoint("teacher", _swap_token_ids), earlier_run=True),
    P("output_dir_overwrite_nan_teacher", "`overwrite=true` over an earlier run, a teacher with a NaN weight (refused "
      "while loading, after the earlier run was set aside: put back)",
      r"config teacher.checkpoint_dir: '.*' holds non-finite weights in 1 tensors \(first: .*attn.* in model.safetensors\)",
      ("overwrite=true",), prepare=_broken_checkpoint("teacher", _nan_weight), before_load=False, earlier_run=True),
    P("resume_nothing", "`resume_from_checkpoint=true` with no checkpoint",
      r"config resume_from_checkpoint: no checkpoint found under", ("resume_from_checkpoint=true",)),
    P("resume_changed_seed", "resume with another `seed`", r"config seed: is 2 but .*step_00000003' was written with 1",
      ("resume_from_checkpoint=true", "seed=2"), earlier_run=True),
    P("resume_corrupt_latest", "resume when the newest checkpoint is truncated (recovery)",
      r"checkpoint .*step_00000003 is corrupt \(optimizer/__0_0.distcp has \d+ bytes.*resuming from .*step_00000002 "
      r"instead",
      ("resume_from_checkpoint=true",), prepare=_earlier_checkpoint_damaged, rc=0, before_load=None, earlier_run=True,
      outcome="recovery"),
    P("disk_full", "disk full while writing the second checkpoint (2.5 MB tmpfs)",
      r"could not write checkpoint '.*step_00000002'.*MiB free on that file system. The torn folder was removed; "
      r"the previous checkpoint '.*step_00000001' is intact",
      prepare=_tmpfs_output_dir, before_load=None, outcome="stop"),
    P("disk_full_export", "disk full after the last checkpoint, while exporting the student",
      r"could not export the student to '.*/hf_model': .*MiB free on that file system. An earlier export there "
      r"is intact; the training state is in '.*step_00000006'",
      prepare=_earlier_run_on_tmpfs, patch=_fill_disk_after_last_checkpoint, before_load=None, earlier_run=True,
      outcome="stop"),
    # non-finite values and divergence
    P("teacher_nan_outputs", "teacher outputs NaN from step 2 (finite weights), guards.on_nonfinite=stop",
      r"RunStopped: step 2: the divergence term is not finite; source: the teacher's outputs hold NaN/inf",
      ("guards.on_nonfinite=stop", "save_every_n_steps=1"), patch=_teacher_nan_from_step(2), before_load=None,
      outcome="stop"),
    P("nan_skipped", "one NaN loss at step 2 (recovery: skipped, the run goes on)",
      r"step 2: the divergence term is not finite; .*the step was skipped \(1 in a row",
      patch=_one_nan_loss_at(2), rc=0, before_load=None, outcome="recovery"),
    P("lr_blowup", "`optimizer.lr=1e6`", r"RunStopped: step \d: .*(not finite|diverged)",
      ("optimizer.lr=1e6", "lr_scheduler.min_lr=1e6", "save_every_n_steps=1", "epochs=2"), before_load=None,
      outcome="stop"),
    P("val_loss_diverges", "validation loss 10x its first value", r"RunStopped: step 6: validation loss 10 exceeds 5 x its first value 1",
      ("epochs=2",), patch=_val_losses(1.0, 10.0), before_load=None, outcome="stop"),
    P("val_loss_diverges_warn", "the same with guards.on_divergence=warn (the student goes to hf_model_diverged)",
      r"validation loss 10 exceeds 5 x its first value 1: the run diverged; continuing",
      ("epochs=2", "guards.on_divergence=warn"), patch=_val_losses(1.0, 10.0), rc=0, before_load=None, outcome="warning"),
    # signals and processes (real `tune run`)
    P("sigkill_mid_step", "SIGKILL at the start of step 3, then resume", r"resumed from .*step_00000002 .*all 6 steps logged",
      process=_signal_then_resume("SIGKILL", "step", 3), rc=(-9, 0), before_load=None, slow=True, outcome="recovery"),
    P("sigterm_after_save", "SIGTERM right after the step-4 checkpoint, then resume",
      r"resumed from .*step_00000004 .*all 6 steps logged",
      process=_signal_then_resume("SIGTERM", "after_save", 4), rc=(-15, 0), before_load=None, slow=True, outcome="recovery"),
    P("sigint_mid_step", "SIGINT (Ctrl-C) at the start of step 5, then resume",
      r"resumed from .*step_00000004 .*all 6 steps logged",
      process=_signal_then_resume("SIGINT", "step", 5), rc=(1, 0), before_load=None, slow=True, outcome="recovery"),
    P("sigkill_during_save", "SIGKILL while the step-4 checkpoint is half written, then resume",
      r"resumed from .*step_00000002 .*all 6 steps logged",
      process=_signal_then_resume("SIGKILL", "during_save", 4), rc=(-9, 0), before_load=None, slow=True, outcome="recovery"),
    P("rank_killed", "kill -9 of rank 1 of a 2-process FSDP run",
      r"launcher exited \d+ s after the kill, 0 worker\(s\) left; .*exitcode *: -9",
      process=_kill_one_rank, rc=1, before_load=None, slow=True, outcome="stop"),
    P("nan_on_one_rank", "NaN divergence on rank 1 only, 2-process FSDP, guards.on_nonfinite=stop",
      r"\[rank0\] and \[rank1\] raised RunStopped in step 2, launcher exited after \d+ s: RunStopped: step 2: "
      r"the divergence term is not finite",
      process=_nan_on_one_rank, rc=1, before_load=None, slow=True, outcome="stop"),
    P("launcher_killed", "kill -9 of the `tune run --nproc_per_node 2` launcher",
      r"2 workers, 0 alive .* after the launcher was killed; output dir no longer written",
      process=_kill_launcher, rc=-9, before_load=None, slow=True, outcome="stop"),
]


@pytest.fixture(scope="module")
def earlier_run(tiny_assets, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("earlier") / "run")
    h.run_recipe(tiny_assets, out, "method=kd", "save_every_n_steps=2", "keep_last_checkpoints=3")
    return out


def _hashes(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            if f != ".lock":
                p = os.path.join(root, f)
                out[os.path.relpath(p, folder)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def _run_in_process(probe, ctx, monkeypatch, caplog):
    from distillm_tune.recipes import kd_offpolicy

    loads = []
    real_load = kd_offpolicy.load_hf
    monkeypatch.setattr(kd_offpolicy, "load_hf", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    if probe.patch is not None:
        probe.patch(monkeypatch, ctx)
    extra = probe.prepare(ctx) if probe.prepare else []
    with caplog.at_level(logging.WARNING):
        try:
            h.run_recipe(ctx.assets, ctx.out, "method=kd", *probe.args, *extra)
            rc, message = 0, "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
        except Exception as e:  # noqa: BLE001 - what `tune run` would print before exiting 1
            rc, message = 1, f"{type(e).__name__}: {e}"
    return rc, message, (not loads) if rc else None


@pytest.mark.parametrize("probe", [pytest.param(p, id=p.id, marks=[pytest.mark.slow] if p.slow else [])
                                   for p in PROBES])
def test_probe(probe, tiny_assets, earlier_run, tmp_path, monkeypatch, caplog):
    ctx = Ctx(assets=tiny_assets, tmp=str(tmp_path), out=str(tmp_path / "out"), earlier=earlier_run)
    if probe.earlier_run:
        shutil.copytree(earlier_run, ctx.out)
    before = _hashes(ctx.out) if os.path.isdir(ctx.out) else {}
    t0 = time.perf_counter()
    try:
        if probe.process is not None:
            rc, message = probe.process(ctx)
            before_load = None
        else:
            rc, message, before_load = _run_in_process(probe, ctx, monkeypatch, caplog)
        elapsed = time.perf_counter() - t0
        assert rc == probe.rc, message[-3000:]
        found = re.search(probe.expect, message, re.S)
        assert found, message[-3000:]
        if probe.before_load is not None:
            assert before_load == probe.before_load, message
        if probe.outcome == "error" and not probe.earlier_run:  # refused at setup, not after training a step
            metrics = os.path.join(ctx.out, "metrics.jsonl")
            assert not (os.path.exists(metrics) and h.read_metrics(ctx.out)), "the run trained before it failed"
        waited = re.search(r"(?:exited|alive) (?:after )?(\d+) s", message)
        if waited:  # no hang: a failed or orphaned process is gone within a minute
            assert int(waited.group(1)) < 60, message
        _assert_nothing_lost(probe, ctx, before, failed=rc == 1 and probe.process is None)
    finally:
        if getattr(_tmpfs_output_dir, "mounted", None):
            subprocess.run(["umount", "-l", _tmpfs_output_dir.mounted], check=False)
            _tmpfs_output_dir.mounted = None
        if getattr(_hold_lock, "held", None) is not None:
            _hold_lock.held.close()
            _hold_lock.held = None
    shown = next((line for line in message.splitlines() if re.search(probe.expect, line)), message.splitlines()[0])
    shown = shown.replace(ctx.tmp, "<tmp>").replace(ctx.assets, "<assets>")
    if probe.before_load is None:
        before_load = None
    RESULTS[probe.id] = {
        "probe": probe.id, "fault": probe.fault, "outcome": probe.outcome,
        "rc": " then ".join(str(c) for c in rc) if isinstance(rc, tuple) else str(rc),
        "message": shown.strip()[:240],
        "before_load": {True: "yes", False: "no (while loading it)", None: "n/a"}[before_load],
        "lost": "nothing: earlier run byte-identical" if probe.earlier_run else "nothing",
        "time_s": f"{elapsed:.1f}",
    }


def _assert_nothing_lost(probe, ctx, before, failed):
    """Every file an earlier run left is byte-identical (metrics.jsonl and config.yaml are logs a resumed
    run writes again, it moves
    `latest`, one that recovers may rewrite its own newest checkpoint), a failed run exported nothing, and every
    checkpoint left behind verifies against its manifest."""
    after = _hashes(ctx.out) if os.path.isdir(ctx.out) else {}
    keep = [f for f in before if f not in ("metrics.jsonl", "config.yaml")]  # logs a resumed run writes again
    if probe.outcome == "error" and probe.earlier_run:  # refused: every file as it was, the logs too
        keep = list(before)
        assert sorted(after) == sorted(before), f"files added or removed: {set(after) ^ set(before)}"
    if probe.outcome != "error":  # a run that trained on from the earlier one moves its `latest` pointer
        keep.remove("checkpoints/latest") if "checkpoints/latest" in keep else None
    if probe.outcome == "recovery" and probe.earlier_run:  # the resumed run goes on from the intact checkpoint
        keep = [f for f in keep if f.startswith("checkpoints/step_00000002/")]
    changed = [f for f in keep if after.get(f) != before[f]]
    assert not changed, f"files of the earlier run changed: {changed}"
    if failed and not probe.earlier_run:
        assert not os.path.isdir(os.path.join(ctx.out, "hf_model")), "a failed run exported a student"
    if os.path.isdir(os.path.join(ctx.out, "checkpoints")):
        _assert_checkpoints_intact(ctx.out)


VALIDATE_EXEMPT = {"output_dir_locked": "a lock is held by a running process; validate takes none"}


def _refused_before_load(p):
    return p.outcome == "error" and p.before_load is True and p.process is None and p.patch is None


@pytest.mark.parametrize("probe", [pytest.param(p, id=p.id) for p in PROBES
                                   if _refused_before_load(p) and p.id not in VALIDATE_EXEMPT])
def test_validate_refuses_what_the_recipe_refuses(probe, tiny_assets, earlier_run, tmp_path):
    """`distillm-tune validate` and the recipe on each probe the recipe refuses before loading a
    model: both refuse, with the same message (validate says "valid" exactly when the run would start)."""
    from distillm_tune import cli

    ctx = Ctx(assets=tiny_assets, tmp=str(tmp_path), out=str(tmp_path / "out"), earlier=earlier_run)
    if probe.earlier_run:
        shutil.copytree(earlier_run, ctx.out)
    extra = probe.prepare(ctx) if probe.prepare else []
    before = _hashes(ctx.out) if os.path.isdir(ctx.out) else None
    args = [f"assets_dir={ctx.assets}", f"output_dir={ctx.out}", *h.FAST, "method=kd", *probe.args, *extra]
    with pytest.raises(SystemExit) as refused:
        cli.main(["validate", h.TINY_CONFIG, *args])
    validate_message = str(refused.value)
    assert (_hashes(ctx.out) if os.path.isdir(ctx.out) else None) == before  # validate wrote nothing
    with pytest.raises(Exception) as recipe_refused:
        h.run_recipe(ctx.assets, ctx.out, "method=kd", *probe.args, *extra)
    recipe_message = str(recipe_refused.value)
    assert re.search(probe.expect, f"{recipe_refused.type.__name__}: {recipe_message}", re.S), recipe_message
    assert re.search(probe.expect, validate_message, re.S), validate_message
    assert recipe_message in validate_message  # the same error: "error: CONFIG: <the recipe's message>"


def _assert_checkpoints_intact(out):
    from distillm_tune.training.checkpointing import RecipeCheckpointer

    ckpt = RecipeCheckpointer(out)
    for name in ckpt._names():
        path = os.path.join(ckpt.root, name)
        assert ckpt.verify(path) is None, name  # every file of the manifest, DCP shards included


COLUMNS = ("probe", "fault", "outcome", "rc", "message", "before_load", "lost", "time_s")
HEADER = ("| probe | fault | outcome | exit code | message (excerpt) | before any model load | lost | time (s) |\n"
          "|---|---|---|---|---|---|---|---:|\n")


def _row(r):
    cells = [str(r[c]).replace("|", "\\|") for c in COLUMNS]
    return "| " + " | ".join(cells) + " |"


def test_reliability_table_matches_the_suite():
    """docs/reliability.md is this suite's output: rows, behaviour, exit codes and messages as measured."""
    rows = [RESULTS[p.id] for p in PROBES if p.id in RESULTS]
    body = "\n".join(_row(r) for r in rows)
    if os.environ.get("RELIABILITY_TABLE"):
        assert len(rows) == len(PROBES), f"the table needs every probe; this session ran {len(rows)} of {len(PROBES)}"
        with open(os.environ["RELIABILITY_TABLE"], "w") as f:
            f.write(_document(body, len(rows)))
    committed = open(TABLE).read()
    committed_rows = [line for line in committed.splitlines() if line.startswith("| ") and not line.startswith("| probe")]

    def stable(line):  # the message excerpt (paths, pids, sizes) and the time vary from run to run
        cells = line.split(" | ")
        return cells[:4] + cells[5:7]
    assert len(committed_rows) == len(PROBES), "docs/reliability.md lacks probes: regenerate it"
    # the probes this session ran (all of them in CI) must read as the committed table says
    committed_by_id = {stable(x)[0]: stable(x) for x in committed_rows}
    assert [committed_by_id.get(stable(_row(r))[0]) for r in rows] == [stable(_row(r)) for r in rows], \
        "docs/reliability.md is stale: regenerate with RELIABILITY_TABLE=docs/reliability.md python -m pytest tests/faults"


def _document(body, n):
    return (
        "# Reliability: what each fault does\n\n"
        f"Produced by the fault-injection suite (`tests/faults/test_faults.py`, {n} probes) with\n"
        "`RELIABILITY_TABLE=docs/reliability.md python -m pytest tests/faults`; the suite fails when this\n"
        "table no longer matches what it measures (every column but the message excerpt and the time, which\n"
        "carry paths and pids). Each probe asserts the exit\n"
        "code, the message (naming the key or file), whether the failure comes before any model is loaded,\n"
        "and that nothing earlier is lost: an earlier run's files are byte-identical afterwards, every\n"
        "checkpoint a stopped run leaves verifies against its manifest, and a failed run exports nothing.\n"
        "In-process probes give the exit code `tune run` gives for the exception (1); the signal and\n"
        "process probes run `tune run` itself (a tuple: the interrupted run, then the resumed one).\n"
        "Times are from one run of the suite on the 2-core CPU machine.\n\n"
        + HEADER + body + "\n"
    )
