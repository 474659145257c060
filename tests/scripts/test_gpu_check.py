"""benchmarks/gpu_check.sh: its CPU dry run runs every step of the GPU check at tiny size and
prints the one table (the GPU figures themselves need a GPU)."""

import json
import math
import os
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_dry_run_exercises_every_step_and_prints_one_table(tmp_path):
    out = tmp_path / "figures.json"
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", os.path.join(REPO, "benchmarks", "gpu_check.sh"), "--workdir", str(tmp_path / "w")],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| case | shape | precision") and len(table) == 1 + 8
    figures = json.loads(out.read_text())
    assert figures["dry_run"] and figures["device"] == "cpu"
    rows = figures["rows"]
    recipe = {(r["shape"].split()[0], r["precision"], r["path"]): r for r in rows if r["case"] == "recipe"}
    assert set(recipe) == {(s, p, path) for s in ("tiny", "gpt2") for p, path in
                           (("fp32", "logits"), ("mixed-bf16", "logits"), ("mixed-bf16", "fused"))}
    for (shape, precision, path), r in recipe.items():
        assert r["steps"] == (3 if shape == "tiny" else 2) and math.isfinite(r["final_loss"]) and r["tokens_per_s"] > 0
        if precision == "mixed-bf16":
            # against the run it names (fp32 logits, or mixed logits for the fused path): bf16 rounding only
            assert r["vs"] == ("fp32 logits" if path == "logits" else "mixed-bf16 logits")
            assert 0 < r["max_rel_dev"] < 1e-2
    gen = {r["path"]: r for r in rows if r["case"] == "generate"}
    assert set(gen) == {"transformers generate", "generate_responses"}
    assert all(g["tokens_per_s"] > 0 for g in gen.values())
