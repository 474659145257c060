"""Training time of each method relative to plain KD, in one run (paper Fig. 5/7, Tab. 9).

    python benchmarks/bench_methods.py                      # tiny demo shapes, 40 steps each
    python benchmarks/bench_methods.py --shape gpt2 --steps 6   # GPT-2-small student, GPT-2-medium teacher

Every method runs the ``kd_offpolicy`` recipe on the same data for the same number of optimizer
steps; the table reports the mean optimizer-step time (generation included, setup and
validation excluded), its ratio to ``kd`` (the named baseline) and the SGO overhead, i.e. the
extra seconds per step over ``kd``. ``distillm`` runs twice: with the adaptive schedule as it
happens (φ starts at 0 and rises only when the validation loss does) and with ``sgo.phi0=1``,
the most student generation the schedule can ask for (λ_R = 1 − t/T, the rest replay).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RUNS = [
    ("kd", ["method=kd"]),
    ("imitkd", ["method=imitkd"]),
    ("gkd", ["method=gkd"]),
    ("distillm (adaptive)", ["method=distillm"]),
    ("distillm (phi0=1)", ["method=distillm", "sgo.phi0=1.0"]),
]


def make_gpt2_shapes(assets: str) -> None:
    """Random GPT-2-small (student) and GPT-2-medium (teacher) with GPT-2's vocabulary size."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    for name, (layers, dim, heads) in {"student": (12, 768, 12), "teacher": (24, 1024, 16)}.items():
        out = os.path.join(assets, name)
        shutil.rmtree(out, ignore_errors=True)
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=dim, n_layer=layers, n_head=heads,
                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        GPT2LMHeadModel(cfg).save_pretrained(out)
        for f in os.listdir(os.path.join(assets, "tokenizer")):
            shutil.copy(os.path.join(assets, "tokenizer", f), out)


def run(assets: str, out: str, overrides):
    from omegaconf import OmegaConf

    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    cfg = OmegaConf.merge(OmegaConf.load(os.path.join(REPO, "configs", "tiny_cpu.yaml")),
                          OmegaConf.from_dotlist([f"assets_dir={assets}", f"output_dir={out}", *overrides]))
    recipe = KDOffPolicyRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["demo", "gpt2"], default="demo")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()

    from distillm_tune.scripts.make_tiny_assets import make_tiny_assets

    work = tempfile.mkdtemp(prefix="bench_methods_")
    assets = os.path.join(work, "assets")
    make_tiny_assets(assets, train=max(400, args.steps * args.batch_size), valid=64, test=8)
    if args.shape == "gpt2":
        make_gpt2_shapes(assets)
    common = [f"epochs=1", f"max_steps_per_epoch={args.steps}", f"batch_size={args.batch_size}",
              f"sgo.max_new_tokens={args.max_new_tokens}", "validation.max_examples=16",
              f"device={args.device}", f"dtype={args.dtype}", "log_every_n_steps=1"]
    print(f"shape={args.shape} steps={args.steps} batch={args.batch_size} max_new_tokens={args.max_new_tokens} "
          f"device={args.device} dtype={args.dtype} load={os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for name, overrides in RUNS:
        t0 = time.perf_counter()
        rows = run(assets, os.path.join(work, name.replace(" ", "_")), common + overrides)
        step = [r["step_time"] for r in rows]
        results[name] = {
            "step_s": statistics.mean(step),
            "gen_share": statistics.mean(r["gen_time_share"] for r in rows),
            "sgo": statistics.mean(r["source_sgo"] for r in rows),
            "replay": statistics.mean(r["source_replay"] for r in rows),
            "wall_s": time.perf_counter() - t0,
        }
        print(f"  {name}: {results[name]['step_s']:.3f} s/step", flush=True)
    kd = results["kd"]["step_s"]
    print("\n| method | s / step | x kd | SGO overhead s / step | share of steps generating | share replaying | time generating |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.3f} | {r['step_s'] / kd:.2f} | {r['step_s'] - kd:+.3f} | "
              f"{r['sgo']:.2f} | {r['replay']:.2f} | {r['gen_share']:.0%} |")
    imit = results["imitkd"]["step_s"] - kd
    for name in ("distillm (adaptive)", "distillm (phi0=1)"):
        over = results[name]["step_s"] - kd
        print(f"\n{name}: SGO overhead / imitkd's = {over / imit:.2f}" if imit > 0 else "")


if __name__ == "__main__":
    main()
