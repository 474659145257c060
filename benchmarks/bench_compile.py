"""Step time of the recipe with ``compile=true`` against the eager run (the named baseline), in
one process, on the same data and steps.

    python benchmarks/bench_compile.py                              # demo shapes
    python benchmarks/bench_compile.py --shape gpt2 --steps 10      # GPT-2-small / GPT-2-medium, vocab 50257

``compile=true`` compiles each transformer layer of student and teacher (``nn.Module.compile``, as
torchtune's ``compile_model``) and the divergence kernel (``Divergence.compile_kernel``). The
first steps pay the compilation (and a recompilation when the padded length first changes): the
table reports the first ``--warmup`` steps' time apart from the mean of the rest.
"""

import argparse
import os
import statistics
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["demo", "gpt2"], default="demo")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3, help="first steps reported apart (compilation)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--method", default="kd")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.steps <= args.warmup:
        ap.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")

    import torch

    from bench_methods import make_gpt2_shapes, run
    from distillm_tune.scripts.make_tiny_assets import make_tiny_assets

    if args.threads:
        torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="bench_compile_")
    assets = os.path.join(work, "assets")
    make_tiny_assets(assets, train=max(400, args.steps * args.batch_size), valid=64, test=8)
    if args.shape == "gpt2":
        make_gpt2_shapes(assets)
    common = ["epochs=1", f"max_steps_per_epoch={args.steps}", f"batch_size={args.batch_size}",
              "validation.max_examples=16", f"method={args.method}", "overwrite=true"]
    print(f"shape={args.shape} method={args.method} steps={args.steps} batch={args.batch_size} "
          f"threads={torch.get_num_threads()} load={os.getloadavg()[0]:.2f} torch={torch.__version__}", flush=True)
    run(assets, os.path.join(work, "warmup"), common + ["max_steps_per_epoch=2"])  # one-off process costs
    results = {}
    for name, extra in (("eager", []), ("compile=true", ["compile=true"])):
        rows = run(assets, os.path.join(work, name), common + extra)
        results[name] = {
            "first": sum(r["step_time"] for r in rows[: args.warmup]),
            "step": statistics.mean(r["step_time"] for r in rows[args.warmup:]),
            "tokens": statistics.mean(r["tokens_per_sec"] for r in rows[args.warmup:]),
            "loss": rows[-1]["loss"],
        }
        print(f"  {name}: {results[name]['step']:.4f} s/step (load {os.getloadavg()[0]:.2f})", flush=True)
    base = results["eager"]["step"]
    print(f"\n| run | first {args.warmup} steps (s) | s / step after | x eager | tokens / s | final loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        print(f"| {name} | {r['first']:.2f} | {r['step']:.4f} | {r['step'] / base:.2f} | {r['tokens']:.0f} | {r['loss']:.5f} |")


if __name__ == "__main__":
    main()
