"""The CPU reproduction: summarizer on synthetic runs (numbers checked against an independent
computation), run definitions, the shell script's syntax and input checks, and one small end-to-end
run (slow)."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from distillm_tune.scripts import reproduce as rp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "recipes", "reproduce_cpu.sh")
SETTINGS = {"steps_per_epoch": 3, "epochs": 2, "jsd_beta": 0.1, "lr": 5e-4, "train_args": [],
            "rouge_examples": 8, "val_examples": 16, "eval_examples": 16, "eval_seeds": [10, 20]}

# run -> seed -> (step times, source per step, val ROUGE-L at steps 3 and 6, greedy, sampled, best)
SYNTH = {
    "fkl": {1: ([0.10, 0.12, 0.11, 0.10, 0.13, 0.12], "dddddd", (20.0, 22.0), 21.0, 19.5, 22.5),
            2: ([0.20, 0.10, 0.10, 0.10, 0.10, 0.10], "dddddd", (19.0, 23.0), 23.0, 20.5, 23.5)},
    "srkl": {1: ([0.11, 0.11, 0.12, 0.12, 0.10, 0.10], "dddddd", (21.0, 24.0), 24.0, 22.0, 24.0),
             2: ([0.12, 0.12, 0.12, 0.12, 0.12, 0.12], "dddddd", (22.0, 25.0), 26.0, 23.0, 26.5)},
    "distillm": {1: ([0.10, 0.30, 0.10, 0.25, 0.10, 0.10], "dsdsrd", (21.0, 25.0), 25.0, 23.5, 25.0),
                 2: ([0.30, 0.10, 0.28, 0.10, 0.10, 0.12], "sdsdrr", (22.0, 26.0), 27.0, 24.0, 27.0),
                 3: ([0.10, 0.10, 0.10, 0.10, 0.10, 0.40], "dddddS", (20.0, 24.0), 26.0, 23.0, 26.0)},
}
SOURCE = {"d": "dataset", "s": "sgo", "r": "replay", "S": "sgo"}


def _write_run(out, name, seed, spec, settings=SETTINGS):
    times, sources, (v1, v2), greedy, sampled, best = spec
    d = os.path.join(out, "runs", name, f"seed_{seed}")
    os.makedirs(d)
    rows, train_time = [], 0.0
    for i, (t, s) in enumerate(zip(times, sources)):
        train_time += t + 0.5  # train_time also counts validation: the summary must use step_time
        row = {"step": i + 1, "loss": 1.0, "phi": 0.1 if s == "S" else 0.0, "step_time": t,
               "gen_time_share": 0.5 if s in "sS" else 0.0, "train_time": train_time}
        row.update({f"source_{k}": float(SOURCE[s] == k) for k in ("dataset", "sgo", "replay")})
        if i + 1 in (3, 6):
            row.update({"val_loss": 1.0, "val_rouge_l": v1 if i + 1 == 3 else v2})
        rows.append(row)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    result = {"run": name, "seed": seed, "settings": settings, "test_rouge_l_greedy": greedy,
              "test_rouge_l_sampled": {"mean": sampled, "std": 0.3, "per_seed": {"10": sampled, "20": sampled}},
              "best_val_test_rouge_l_greedy": best}
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump(result, f)


@pytest.fixture
def synthetic(tmp_path):
    out = str(tmp_path / "out")
    for name, seeds in SYNTH.items():
        for seed, spec in seeds.items():
            _write_run(out, name, seed, spec)
    # an unfinished run (no result.json) is left out
    os.makedirs(os.path.join(out, "runs", "rkl", "seed_1"))
    with open(os.path.join(out, "runs", "rkl", "seed_1", "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1, "step_time": 9.0}) + "\n")
    return out


def _pmean_pstd(values):
    return statistics.fmean(values), statistics.pstdev(values)


def test_summary_numbers_match_an_independent_computation(synthetic, tmp_path):
    report = str(tmp_path / "docs" / "reproduction.md")
    rp.main(["summarize", synthetic, "--out", report])
    with open(str(tmp_path / "docs" / "reproduction.json")) as f:
        js = json.load(f)
    assert list(js["runs"]) == ["fkl", "srkl", "distillm"]  # RUNS order; rkl unfinished
    totals = {n: [sum(spec[0]) for spec in seeds.values()] for n, seeds in SYNTH.items()}
    kd_mean = statistics.fmean(totals["fkl"])
    for name, seeds in SYNTH.items():
        s = js["runs"][name]
        assert s["seeds"] == sorted(seeds)
        for key, idx in (("test_rouge_l_greedy", 3), ("test_rouge_l_sampled", 4),
                         ("best_val_test_rouge_l_greedy", 5)):
            assert s[key] == pytest.approx(_pmean_pstd([spec[idx] for spec in seeds.values()]))
        assert s["train_time_s"] == pytest.approx(_pmean_pstd(totals[name]))
        per_step = [sum(spec[0]) / len(spec[0]) for spec in seeds.values()]
        assert s["step_time_s"] == pytest.approx(_pmean_pstd(per_step))
        mean, std = _pmean_pstd(totals[name])
        assert s["time_vs_kd"] == pytest.approx([mean / kd_mean, std / kd_mean])
        sgo = statistics.fmean(spec[1].count("s") / 6 + spec[1].count("S") / 6 for spec in seeds.values())
        replay = statistics.fmean(spec[1].count("r") / 6 for spec in seeds.values())
        assert s["sgo_share"][0] == pytest.approx(sgo)
        assert s["replay_share"][0] == pytest.approx(replay)
        assert s["steps"] == [6]
    assert js["runs"]["fkl"]["time_vs_kd"][0] == pytest.approx(1.0)
    # validation curve: x = cumulative step_time (not train_time), y = val ROUGE-L
    curve = js["runs"]["fkl"]["per_seed"]["1"]["val_curve"]
    assert [c[0] for c in curve] == pytest.approx([0.33, 0.68])
    assert [c[1:] for c in curve] == [[20.0, 3], [22.0, 6]]
    assert not js["mixed_settings"]

    text = open(report).read()
    d = js["runs"]["distillm"]
    g = _pmean_pstd([spec[3] for spec in SYNTH["distillm"].values()])
    assert f"{g[0]:.2f} ± {g[1]:.2f}" in text
    assert f"×{d['time_vs_kd'][0]:.2f} ± {d['time_vs_kd'][1]:.2f}" in text
    assert "26.11 (0.68)" in text and "23.52 (0.22)" in text and "25.21 (0.27)" in text  # paper columns
    assert "×1.67" in text
    for suffix in ("val_rouge", "time"):
        png = tmp_path / "docs" / f"reproduction_{suffix}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(reproduction_{suffix}.png)" in text


def test_distillm_ratio_exact(synthetic, tmp_path):
    s = rp.summarize(synthetic, str(tmp_path / "r.md"), make_plots=False)
    fkl = [sum(SYNTH["fkl"][k][0]) for k in (1, 2)]
    dl = [sum(SYNTH["distillm"][k][0]) for k in (1, 2, 3)]
    assert s["runs"]["distillm"]["time_vs_kd"][0] == pytest.approx((sum(dl) / 3) / (sum(fkl) / 2))


def test_summary_without_kd_and_with_mixed_settings(tmp_path):
    out = str(tmp_path / "out")
    _write_run(out, "srkl", 1, SYNTH["srkl"][1])
    _write_run(out, "srkl", 2, SYNTH["srkl"][2], settings={**SETTINGS, "epochs": 3})
    s = rp.summarize(out, str(tmp_path / "r.md"), make_plots=False)
    assert s["runs"]["srkl"]["time_vs_kd"] is None
    assert s["mixed_settings"]
    text = (tmp_path / "r.md").read_text()
    assert "no ratios" in text and "not like for like" in text


def test_baseline_table_lists_kd_the_baselines_sft_and_distillm(synthetic, tmp_path):
    _write_run(synthetic, "imitkd", 1, SYNTH["srkl"][1])
    _write_run(synthetic, "imitkd", 2, SYNTH["srkl"][2])
    prepare = {"settings": {"sft_steps": 5, "teacher_epochs": 1, "student_epochs": 1},
               "teacher_test": {"greedy": 40.0}, "student_val_rouge_l": 15.0,
               "student_test": {"greedy": 16.25, "sampled": {"mean": 14.5, "std": 0.25}}}
    with open(os.path.join(synthetic, "prepare.json"), "w") as f:
        json.dump(prepare, f)
    os.makedirs(os.path.join(synthetic, "seqkd"))
    with open(os.path.join(synthetic, "seqkd", "info.json"), "w") as f:
        json.dump({"generation_s": 12.34, "rows": 1999, "seed": 1}, f)
    s = rp.summarize(synthetic, str(tmp_path / "r.md"), make_plots=False)
    assert s["seqkd_generation"]["rows"] == 1999
    text = (tmp_path / "r.md").read_text()
    section = text.split("## Baselines")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:]
    assert [r.split("|")[1].strip().split(":")[0] for r in rows] == [
        "SFT student (start of every run, no distillation)", "`fkl`", "`imitkd`", "`distillm`"]
    g = _pmean_pstd([SYNTH["srkl"][k][3] for k in (1, 2)])  # imitkd got srkl's synthetic numbers
    assert f"{g[0]:.2f} ± {g[1]:.2f}" in rows[2]
    assert "16.25" in rows[0] and "14.50 ± 0.25" in rows[0] and "23.33 (0.22)" in rows[0]
    assert "21.63 (0.51)" in rows[2]  # the paper's ImitKD
    assert "1999 rows" in section and "12.3 s" in section


def test_summarize_without_runs_is_an_error(tmp_path):
    with pytest.raises(SystemExit, match="no finished run"):
        rp.summarize(str(tmp_path), str(tmp_path / "r.md"))


def test_run_definitions():
    assert rp.run_names()[0] == rp.KD_RUN == "fkl"
    assert rp.run_overrides("jsd", jsd_beta=0.5) == [
        "method=kd", "loss._component_=distillm_tune.losses.JSDLoss", "loss.beta=0.5"]
    assert "loss.beta=0.1" in rp.run_overrides("jsd")  # the paper's GKD setting in Eq. 4's convention
    adaptive = rp.run_overrides("srkl_adaptive", phi0=0.0)
    assert "sgo.replay_buffer.capacity=1" in adaptive and "sgo.scheduler.phi0=0.0" in adaptive and "sgo.scheduler.tolerance=0.1" in adaptive
    offpolicy = rp.run_overrides("distillm")
    assert offpolicy[0] == "method=distillm" and "sgo.scheduler.phi0=0.2" in offpolicy
    assert not any(o.startswith("sgo.replay_buffer.capacity") for o in offpolicy)
    for name in ("srkl", "srkl_onpolicy", "srkl_mixed", "srkl_adaptive", "distillm"):
        assert "loss._component_=distillm_tune.losses.SkewReverseKLLoss" in rp.run_overrides(name)
        assert "loss.alpha=0.1" in rp.run_overrides(name)
    assert rp.run_overrides("srkl_mixed")[:2] == ["method=gkd", "sgo.gkd_sgo_prob=0.5"]
    assert rp.run_overrides("srkl_onpolicy")[0] == "method=imitkd"
    for name in ("fkl", "rkl", "jsd", "skl", "srkl"):
        assert rp.run_overrides(name)[0] == "method=kd"
    # the baselines run with the recipe's own divergence for the method (no loss override)
    for name in ("seqkd", "imitkd", "gkd"):
        assert rp.run_overrides(name) == [f"method={name}"]
        assert rp.RUNS[name]["table"] == 3
    with pytest.raises(ValueError, match="unknown run.*bogus"):
        rp.check_runs(["fkl", "bogus"])
    with pytest.raises(ValueError, match="unknown run parameter"):
        rp.run_overrides("fkl", beta=0.5)


def test_adaptive_run_never_replays():
    """srkl_adaptive's premise: with a 1-sample buffer the distillm policy generates with
    probability phi and never replays (the recipe's choose_source and ReplayBuffer)."""
    import torch

    from distillm_tune.sgo import AdaptiveSGOScheduler, ReplayBuffer, choose_source

    sched = AdaptiveSGOScheduler(total_steps=10)
    sched.start(1.0)
    for loss in (1.2, 1.4, 1.6):
        sched.update(loss)  # phi = 0.3
    buf = ReplayBuffer(capacity=1)
    buf.push([{"prompt": [1], "response": [2]}] * 8)
    us = torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tolist()
    for step in (0, 5, 9):
        got = [choose_source("distillm", u, step=step, scheduler=sched, buffer_len=len(buf), batch_size=8)
               for u in us]
        assert "replay" not in got
        assert got == ["sgo" if u < sched.phi else "dataset" for u in us]
    # with the default buffer the same draws do replay
    big = [choose_source("distillm", u, step=9, scheduler=sched, buffer_len=1000, batch_size=8) for u in us]
    assert "replay" in big


def test_shell_script_syntax():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


@pytest.mark.parametrize("env, message", [
    ({"METHODS": "fkl bogus"}, "unknown run 'bogus'"),
    ({"STEPS": "0"}, "STEPS must be a positive integer"),
    ({"SEEDS": "1 x"}, "SEEDS: 'x'"),
])
def test_shell_script_rejects_bad_input_before_work(tmp_path, env, message):
    out = tmp_path / "out"
    r = subprocess.run(["bash", SCRIPT, str(out)], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable, **env})
    assert r.returncode != 0
    assert message in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_quick_reproduction_end_to_end(tmp_path):
    """STEPS=2 SEEDS=1, two runs, tiny SFT: the whole script (about 20 s on 2 cores)."""
    out = tmp_path / "out"
    report = tmp_path / "docs" / "reproduction.md"
    env = {**os.environ, "PYTHON": sys.executable, "STEPS": "2", "EPOCHS": "2", "SEEDS": "1",
           "METHODS": "fkl srkl_adaptive seqkd", "SFT_STEPS": "2", "TEACHER_EPOCHS": "1", "STUDENT_EPOCHS": "1",
           "ROUGE_EXAMPLES": "8", "VAL_EXAMPLES": "16", "EVAL_EXAMPLES": "8", "EVAL_SEEDS": "10",
           "REPORT": str(report), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(["bash", SCRIPT, str(out)], cwd=REPO, capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("fkl", "srkl_adaptive", "seqkd"):
        res = json.loads((out / "runs" / name / "seed_1" / "result.json").read_text())
        assert res["settings"]["steps_per_epoch"] == 2 and res["settings"]["epochs"] == 2
        rows = [json.loads(x) for x in (out / "runs" / name / "seed_1" / "metrics.jsonl").read_text().splitlines()]
        # distillm (srkl_adaptive) also logs a step-0 row: the scheduler's starting validation loss
        assert [x["step"] for x in rows if x["step"] > 0] == [1, 2, 3, 4]
        assert [x for x in rows if x["step"] == 0] == ([] if name != "srkl_adaptive" else [rows[0]])
        assert all(set(x) == {"step", "time", "val_loss_start", "phi"} for x in rows if x["step"] == 0)
        assert sum("val_rouge_l" in x for x in rows) == 2  # every epoch
        assert 0.0 <= res["test_rouge_l_greedy"] <= 100.0
        assert list(res["test_rouge_l_sampled"]["per_seed"]) == ["10"]
        assert not (out / "runs" / name / "seed_1" / "checkpoints").exists()
    assert not list(out.glob("warmup*"))  # the unmeasured warm-up run is removed
    # seqkd trained on the teacher's responses, generated once: one row per training prompt
    seqkd_rows = (out / "seqkd" / "train.jsonl").read_text().splitlines()
    info = json.loads((out / "seqkd" / "info.json").read_text())
    assert info["rows"] == len(seqkd_rows) > 1000
    res = json.loads((out / "runs" / "seqkd" / "seed_1" / "result.json").read_text())
    assert f"seqkd_data={out / 'seqkd' / 'train.jsonl'}" in res["overrides"] and "method=seqkd" in res["overrides"]
    text = report.read_text()
    assert "`fkl`" in text and "`srkl_adaptive`" in text and "×1.00" in text and "## Baselines" in text
    assert (tmp_path / "docs" / "reproduction_time.png").is_file()
    # re-running skips every finished step; other settings in the same folder are refused
    again = subprocess.run(["bash", SCRIPT, str(out)], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and again.stdout.count("skip:") == 4, again.stdout[-2000:]
    other = subprocess.run(["bash", SCRIPT, str(out)], cwd=REPO, capture_output=True, text=True,
                           env={**env, "EPOCHS": "3"}, timeout=600)
    assert other.returncode != 0 and "other settings" in other.stderr


@pytest.mark.slow
def test_smollm2_pair_scores_through_the_chat_template(tmp_path, smollm2_dir, one_thread):
    """PAIR=smollm2 (the real teacher): the teacher used as it is (0 epochs), the cut student SFT'd,
    a KD and a DistiLLM-2 run. The prepare step's greedy ROUGE-L of the teacher (our sampler on
    the chat-template dataset) equals the evaluate recipe's (its own chat rendering) on the same rows;
    DistiLLM-2 samples at the paper's temperature 0.8 / top-p 0.95."""
    from omegaconf import OmegaConf

    from distillm_tune.recipes.evaluate import EvaluateRecipe

    out = tmp_path / "out"
    (out / "base").mkdir(parents=True)
    os.symlink(smollm2_dir, out / "base" / "smollm2-135m-instruct")  # get_smollm2 reuses a converted dir
    # assets made here with few rows (prepare keeps finished assets): the teacher samples a response
    # for every training prompt, which takes minutes for 2000
    from distillm_tune.scripts.make_tiny_assets import make_tiny_assets

    make_tiny_assets(str(out / "assets"), train=32, valid=16, test=16)
    info = rp.prepare(str(out), sft_steps=2, teacher_epochs=0, student_epochs=1, rouge_examples=4,
                      val_examples=8, eval_examples=8, eval_seeds=[], pair="smollm2")
    assert info["teacher"] == str(out / "base" / "smollm2-135m-instruct")
    assert info["student"] == str(out / "student_sft" / "hf_model")
    test = os.path.join(info["assets"], "data", "test.jsonl")
    cfg = OmegaConf.create({
        "model_dir": info["teacher"], "output_dir": str(tmp_path / "eval"), "template": "chat",
        "datasets": [{"name": "test", "path": test, "kind": "instruction"}], "decoding": "greedy",
        "max_seq_len": 160, "max_prompt_len": 128, "greedy_max_new_tokens": 32, "batch_size": 8,
        "max_examples": 8, "device": "cpu", "dtype": "fp32"})
    recipe = EvaluateRecipe(cfg)
    recipe.setup()
    reference = recipe.evaluate()["datasets"]["test"]["metrics"]["rougeL"]["mean"]
    recipe.cleanup()
    assert info["teacher_test"]["greedy"] == pytest.approx(reference, abs=1e-9)
    prompts = [json.loads(x)["prompt"] for x in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert all(p.startswith("<|im_start|>") for p in prompts)

    rp.train(str(out), seed=1, runs=["fkl", "distillm2"], steps=2, epochs=1, train_args=["validation.rouge_examples=0"])
    for name in ("fkl", "distillm2"):
        res = json.loads((out / "runs" / name / "seed_1" / "result.json").read_text())
        assert f"data_dir={os.path.join(info['assets'], 'data')}" in res["overrides"]
        assert res["settings"]["lr"] == rp.PAIRS["smollm2"].distil_lr
    res = json.loads((out / "runs" / "distillm2" / "seed_1" / "result.json").read_text())
    assert {"sgo.temperature=0.8", "sgo.top_p=0.95"} <= set(res["overrides"])
    teacher = json.loads((out / "distillm2_teacher" / "info.json").read_text())
    assert (teacher["temperature"], teacher["top_p"]) == (0.8, 0.95)
    # the chat template's end of turn closes the teacher's responses
    row = json.loads((out / "distillm2_teacher" / "train.jsonl").read_text().splitlines()[0])
    assert "<|im_start|>" not in row["response"]
    report = rp.render_markdown(rp.aggregate(str(out)), {}, "test")
    assert "pair `smollm2`" in report and "SmolLM2-135M-Instruct" in report


def test_generation_stats_of_the_sampled_answers(tmp_path):
    """Words, empty share and per-task ROUGE-L of a run's sampled test answers, against values
    worked out by hand (ROUGE-L of an exact match is 100, of a disjoint answer 0, of 'b c' against
    'a b c d' F = 2·(1·0.5)/(1 + 0.5) = 66.67)."""
    d = tmp_path / "run"
    (d / "eval").mkdir(parents=True)
    gens = [  # (test row, answer, reference)
        (0, "apple fig", "apple fig"), (1, "", "red blue"), (2, "b c", "a b c d"),
        (0, "pear", "apple fig"), (1, "red blue", "red blue"), (2, "a b c d", "a b c d")]
    with open(d / "eval" / "generations.jsonl", "w") as f:
        for seed, (i, g, ref) in zip([10, 10, 10, 20, 20, 20], gens):
            f.write(json.dumps({"dataset": "test", "seed": seed, "index": i, "generation": g, "references": [ref]}) + "\n")
    s = rp.generation_stats(str(d), ["sort", "upper", "count"])
    assert s["words"] == pytest.approx((2 + 0 + 2 + 1 + 2 + 4) / 6)
    assert s["reference_words"] == pytest.approx((2 + 2 + 4 + 2 + 2 + 4) / 6)
    assert s["empty"] == pytest.approx(1 / 6)
    assert s["rouge_by_category"] == pytest.approx({"sort": 50.0, "upper": 50.0, "count": (200 / 3 + 100) / 2})
    assert rp.generation_stats(str(tmp_path / "none"), []) is None
