"""benchmarks/bench_vs_torchtune.py at tiny size: torchtune's stock KD recipe and ours (logits,
fused) run on the same models and batches, and the table compares them (figures:
docs/benchmarks.md §10)."""

import json
import math
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_head_to_head_smoke_run_measures_every_run_on_the_same_workload(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env["TMPDIR"] = str(tmp_path)  # where the script makes (and must remove) its work folder
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_vs_torchtune.py"), "--shapes", "tiny",
                           "--steps", "2", "--warmup", "1", "--batch-size", "2", "--seq-len", "32", "--threads", "1",
                           "--chunk", "8", "--json", str(out)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| shape | run | tokens/s | x torchtune | peak MiB")
    rows = json.loads(out.read_text())
    runs = [r["run"] for r in rows]
    assert len(table) == 1 + len(rows)
    assert runs[:2] == ["torchtune", "ours logits"]
    assert runs[2:] == ["ours fused"]  # at the default kd_ratio 0.5, as the other two
    for r in rows:
        assert r["tokens_s"] > 0 and 0 < r["train_mib"] <= r["peak_mib"] and r["step_mib"] >= 0
        assert (r["x_tps"] == 1.0) == r["run"].startswith("torchtune")
    # same weights, same first batch: the student's step-1 cross-entropy is the same in every run
    ce = [r["ce1"] for r in rows]
    assert all(math.isfinite(c) for c in ce) and max(ce) - min(ce) < 1e-5 * ce[0]
    # the benchmark's checkpoints are removed at the end
    assert not [d for d in os.listdir(tmp_path) if d.startswith("bench_vs_torchtune_")]
