"""How closely bf16 training follows the fp32 run: ``dtype=bf16`` (bf16 weights and AdamW state)
vs ``mixed_precision=bf16`` (fp32 master weights and state, bf16 compute), over the same batches.

    python benchmarks/bench_mixed_precision.py               # 300 steps of configs/tiny_cpu.yaml, method=kd
    python benchmarks/bench_mixed_precision.py --steps 36    # quicker

Runs (each in this process, ``method=kd`` so all see the same batches; validation only at the end):
fp32 (the reference), ``dtype=bf16``, ``mixed_precision=bf16`` (teacher held in bf16, the recipe's
choice) and the same with the teacher kept in fp32 (to show what holding the frozen teacher in bf16
costs). Reported per run: max, final and mean relative deviation of the per-step losses from the
fp32 run's, the final loss, and the mean step time.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def run(assets, out, overrides, teacher_fp32=False):
    import torch
    from omegaconf import OmegaConf

    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(REPO, "configs", "tiny_cpu.yaml")),
                          OmegaConf.from_dotlist([f"assets_dir={assets}", f"output_dir={out}", *overrides]))
    recipe = KDOffPolicyRecipe(cfg)
    if teacher_fp32:  # the alternative the recipe does not take: the frozen teacher in fp32 under autocast
        recipe.teacher_dtype = torch.float32
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["step"] > 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="a multiple of 12 (96 rows / batch 8 per epoch)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    import torch

    from distillm_tune.scripts.make_tiny_assets import make_tiny_assets

    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench_mixed_precision_")
    assets = os.path.join(work, "assets")
    make_tiny_assets(assets, train=96, valid=16, test=16)
    base = ["method=kd", "batch_size=8", "max_steps_per_epoch=12", f"epochs={max(1, args.steps // 12)}",
            "validation.max_examples=8", "validation.batch_size=8", f"validation.every_n_steps={args.steps}"]
    runs = [("fp32", [], False), ("dtype=bf16", ["dtype=bf16"], False),
            ("mixed_precision=bf16", ["mixed_precision=bf16"], False),
            ("mixed_precision=bf16, teacher fp32", ["mixed_precision=bf16"], True)]
    rows = {name: run(assets, os.path.join(work, str(i)), base + over, t32) for i, (name, over, t32) in enumerate(runs)}
    ref = rows["fp32"]
    print(f"\nconfigs/tiny_cpu.yaml, method=kd, batch 8, {len(ref)} steps, {args.threads} thread(s), "
          f"torch {torch.__version__}; relative deviation |loss - fp32 loss| / fp32 loss per step\n")
    print("| run | max rel dev | final rel dev | mean rel dev | final loss | s/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        dev = [abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(r, ref)]
        print(f"| {name} | {max(dev):.2e} | {dev[-1]:.2e} | {statistics.mean(dev):.2e} | {r[-1]['loss']:.6f} "
              f"| {statistics.mean(x['step_time'] for x in r[1:]):.4f} |")


if __name__ == "__main__":
    main()
