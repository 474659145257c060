"""Training time of each method relative to plain KD, in one run (paper Fig. 5/7, Tab. 9).

    python benchmarks/bench_methods.py                                   # tiny demo shapes
    python benchmarks/bench_methods.py --shape gpt2 --steps 12 --rounds 2 --threads 1
                                           # GPT-2-small student, GPT-2-medium teacher, vocab 50257

Every method runs the ``kd_offpolicy`` recipe on the same data for the same number of optimizer
steps; the table reports the mean optimizer-step time (generation included, setup and
validation excluded), its ratio to ``kd`` (the named baseline) and the SGO overhead, i.e. the
extra seconds per step over ``kd``, next to the share of steps that generated.

Fairness of the timing: a throwaway ``kd`` run goes first (the first recipe run of a process pays
one-off costs: allocator growth, first use of kernels), the first step of every run is left out of
its mean, and with ``--rounds 2`` or more the methods run in alternating order (forward, then
reversed), so slow drift of the machine's load hits every method alike.

``distillm`` runs twice. Over a few steps its validation-driven schedule cannot move, so φ stays
at ``sgo.scheduler.phi0``: ``phi0=0.2`` is the OpenLLaMA setting (DISTILLM_SPEC §6) and the φ of the CPU
reproduction's adaptive runs, which start there and never rose (``docs/reproduction.md``); ``phi0=1`` is the most student
generation the schedule can ask for (every step uses SGO; with λ_R = 1 − t/T the rest replay).

``distillm2`` (code_faithful preset; one epoch, so paper_full would differ only by b) samples the
student's responses to the epoch's prompts once, at its start (``student_sampling_time``), and every
step runs both models on 2B rows (B teacher + B student responses). Its s / step is the mean step
time plus the epoch's sampling time spread over the run's steps; its teacher responses (generated
once, before training, like SeqKD's) are not counted.
"""

import argparse
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

RUNS = [
    ("kd", ["method=kd"]),
    ("imitkd", ["method=imitkd"]),
    ("gkd", ["method=gkd"]),
    ("distillm (phi0=0.2)", ["method=distillm", "sgo.scheduler.phi0=0.2"]),
    ("distillm (phi0=1)", ["method=distillm", "sgo.scheduler.phi0=1.0"]),
    ("distillm2", ["method=distillm2"]),
]


GPT2_SHAPES = {"small": (12, 768, 12), "medium": (24, 1024, 16)}  # (layers, width, heads)


def make_gpt2_shapes(assets: str, student: str = "small", teacher: str = "medium") -> None:
    """Random GPT-2-small (student) and GPT-2-medium (teacher), or the shapes named, with GPT-2's
    vocabulary size."""
    import shutil

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    for name, (layers, dim, heads) in {"student": GPT2_SHAPES[student], "teacher": GPT2_SHAPES[teacher]}.items():
        out = os.path.join(assets, name)
        shutil.rmtree(out, ignore_errors=True)
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=50257, n_positions=1024, n_embd=dim, n_layer=layers, n_head=heads,
                         bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        GPT2LMHeadModel(cfg).save_pretrained(out)
        for f in os.listdir(os.path.join(assets, "tokenizer")):
            shutil.copy(os.path.join(assets, "tokenizer", f), out)


def run(assets: str, out: str, overrides):
    """One recipe run on configs/tiny_cpu.yaml (``demo.run``); its per-step metrics rows."""
    from distillm_tune.scripts.demo import run as run_recipe

    return run_recipe(os.path.basename(out), out, [f"assets_dir={assets}", f"output_dir={out}", *overrides])["rows"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["demo", "gpt2"], default="demo")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per method and round")
    ap.add_argument("--rounds", type=int, default=1, help="rounds over all methods, alternating order")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.steps < 2:
        ap.error(f"--steps must be at least 2 (the first step of a run is not counted), got {args.steps}")
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")

    import torch

    from distillm_tune.scripts.make_tiny_assets import make_tiny_assets

    if args.threads:
        torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench_methods_")
    assets = os.path.join(work, "assets")
    make_tiny_assets(assets, train=max(400, args.steps * args.batch_size * args.rounds), valid=64, test=8)
    if args.shape == "gpt2":
        make_gpt2_shapes(assets)
    common = ["epochs=1", f"max_steps_per_epoch={args.steps}", f"batch_size={args.batch_size}",
              f"sgo.max_new_tokens={args.max_new_tokens}", "validation.max_examples=16",
              f"device={args.device}", f"dtype={args.dtype}", "log_every_n_steps=1"]
    print(f"shape={args.shape} steps={args.steps} rounds={args.rounds} batch={args.batch_size} "
          f"max_new_tokens={args.max_new_tokens} device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} load={os.getloadavg()[0]:.2f}", flush=True)
    run(assets, os.path.join(work, "warmup"), common + ["method=kd", "max_steps_per_epoch=2"])
    rows_of = {name: [] for name, _ in RUNS}
    for rnd in range(args.rounds):
        order = RUNS if rnd % 2 == 0 else RUNS[::-1]
        for name, overrides in order:
            out = os.path.join(work, f"r{rnd}_" + name.replace(" ", "_"))
            rows = run(assets, out, common + [f"seed={args.seed + rnd}"] + overrides)
            sampling = sum(r.get("student_sampling_time", 0.0) for r in rows)  # distillm2, per epoch
            for r in rows:  # spread over the run's steps: part of every step's cost
                share = sampling / len(rows)
                r["gen_time_share"] = (r["gen_time_share"] * r["step_time"] + share) / (r["step_time"] + share)
                r["step_time"] += share
                r.setdefault("source_sgo", 1.0 if sampling else 0.0)
                r.setdefault("source_replay", 0.0)
            rows_of[name] += rows[1:]  # the first step of a run is not counted
            print(f"  round {rnd + 1} {name}: {statistics.mean(r['step_time'] for r in rows[1:]):.3f} s/step "
                  f"(load {os.getloadavg()[0]:.2f})", flush=True)
    results = {}
    for name, rows in rows_of.items():
        gen_rows = [r for r in rows if r["source_sgo"] > 0]
        results[name] = {
            "step_s": statistics.mean(r["step_time"] for r in rows),
            "gen_share": sum(r["gen_time_share"] * r["step_time"] for r in rows) / sum(r["step_time"] for r in rows),
            "sgo": statistics.mean(r["source_sgo"] for r in rows),
            "replay": statistics.mean(r["source_replay"] for r in rows),
            "gen_s": statistics.mean(r["gen_time_share"] * r["step_time"] for r in gen_rows) if gen_rows else 0.0,
            "steps": len(rows),
        }
    kd = results["kd"]["step_s"]
    print("\n| method | s / step | x kd | SGO overhead s / step | steps generating | steps replaying | "
          "time generating | s per generation |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.3f} | {r['step_s'] / kd:.2f} | {r['step_s'] - kd:+.3f} | "
              f"{r['sgo']:.2f} | {r['replay']:.2f} | {r['gen_share']:.0%} | {r['gen_s']:.3f} |")
    print(f"\n{results['kd']['steps']} timed steps per method ({args.rounds} round(s) x ({args.steps} - 1))")
    imit = results["imitkd"]["step_s"] - kd
    for name, _ in RUNS:
        if name.startswith("distillm") and imit > 0:
            over = results[name]["step_s"] - kd
            print(f"{name}: SGO overhead / imitkd's = {over / imit:.2f} "
                  f"(share of steps generating {results[name]['sgo']:.2f})")


if __name__ == "__main__":
    main()
