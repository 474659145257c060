"""One GPU check of the scale-up features, printing one table (driver of ``gpu_check.sh``).

    bash benchmarks/gpu_check.sh                  # CUDA, 1 process: under 8 minutes on one GPU
    DRY_RUN=1 bash benchmarks/gpu_check.sh        # CPU, every step at tiny size (tests run this)
    python benchmarks/gpu_check.py --dry-run      # the same, without the shell wrapper

Rows (each recipe run is ``kd_offpolicy`` with ``method=kd``, so runs of one shape see the same
batches and their per-step losses can be compared):

  recipe  tiny       fp32          logits   reference of the tiny rows
  recipe  tiny       mixed bf16    logits   max / final rel. deviation of the per-step losses vs fp32
  recipe  tiny       mixed bf16    fused    (``fused_loss_chunk_size``) vs the mixed logits run
  recipe  gpt2       fp32          logits   GPT-2-small student, GPT-2-medium teacher, V=50257
  recipe  gpt2       mixed bf16    logits   vs the gpt2 fp32 run; peak memory and step time vs it
  recipe  gpt2       mixed bf16    fused    vs the gpt2 mixed logits run
  generate gpt2-small bf16         transformers ``generate`` vs ``generate_responses`` (tokens/s;
                                   bench_generation.py's contenders, same weights and prompts)

Peak memory: ``torch.cuda.max_memory_allocated`` per run (reset before each); on CPU (dry run) it
is not measured ("-"). Step time: mean without the first step. The dry run replaces the GPT-2
shapes by the tiny models and runs 2-3 steps: it checks that every step works, not its figures.
"""

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)
ROWS = 96  # training rows of each shape


def _rel_dev(rows, ref):
    dev = [abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(rows, ref)]
    return max(dev), dev[-1]


def recipe_case(device, assets, out, shape, precision, path, steps, seq_len, batch):
    """One recipe run in this process; its rows, mean step time and peak CUDA memory."""
    import torch

    from distillm_tune.scripts.demo import run

    per_epoch = min(steps, ROWS // batch)  # the rows give ROWS // batch steps per epoch
    over = [f"assets_dir={assets}", f"output_dir={out}", "method=kd", f"epochs={-(-steps // per_epoch)}",
            f"max_steps_per_epoch={per_epoch}",
            f"batch_size={batch}", "validation.max_examples=8", "validation.batch_size=8", f"device={device.type}",
            "save_every_n_steps=null", "log_every_n_steps=1", f"max_seq_len={seq_len}",
            f"max_prompt_len={seq_len * 2 // 3}", f"dataset.source={assets}/data/long.jsonl",
            f"validation.dataset.source={assets}/data/long.jsonl"]
    if precision == "mixed-bf16":
        over.append("mixed_precision=bf16")
    if path == "fused":
        over.append("fused_loss_chunk_size=1024")
    gc.collect()  # the previous run's models and optimizer state
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    res = run(f"{shape} {precision} {path}", out, over)
    rows = [r for r in res["rows"] if r["step"] > 0]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    times = [r["step_time"] for r in rows[1:]] or [rows[0]["step_time"]]
    tokens = statistics.mean(r["tokens_per_sec"] * r["step_time"] for r in rows)
    return {"rows": rows, "step_s": statistics.mean(times), "tok_s": tokens / statistics.mean(times), "peak": peak}


def generation_case(device, small, repeats, new_tokens):
    """bench_generation.py's transformers-vs-ours comparison in bf16 (fp32 on the CPU dry run)."""
    import torch

    import bench_generation as bg

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = types.SimpleNamespace(small=small, vocab=50257, batch=8, prompt_len=64, min_prompt_len=40,
                                 new_tokens=new_tokens, device=device.type)
    hf, tt, _ = bg.build_models(args, device, dtype)
    runners = bg.make_runners(args, hf, tt, device, dtype)
    names = ["hf", "ours"]
    times, peaks, counts = bg.time_interleaved(runners, names, device, warmup=1, repeats=repeats)
    expected = args.batch * args.new_tokens
    if any(c != expected for c in counts.values()):
        raise RuntimeError(f"unequal generated token counts (expected {expected}): {counts}")
    out = {}
    for k in names:
        med = statistics.median(times[k])
        out[k] = {"tok_s": expected / med, "peak": peaks[k] / 2**30 if device.type == "cuda" else None,
                  "per_round": statistics.median(h / t for h, t in zip(times["hf"], times[k]))}
    return out, str(dtype).replace("torch.", "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, few steps: exercise every step")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    ap.add_argument("--tiny-steps", type=int, default=60)
    ap.add_argument("--gpt2-steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None, help="also write the table's figures to this file")
    args = ap.parse_args()

    import torch

    dry = args.dry_run
    device = torch.device(args.device or ("cpu" if dry else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: CUDA is not available; run the CPU dry run with DRY_RUN=1 (or --dry-run)")
    if dry:
        torch.set_num_threads(1)
        args.tiny_steps, args.gpt2_steps, args.seq_len, args.batch_size = 3, 2, 96, 4
    t_start = time.perf_counter()

    from bench_methods import make_gpt2_shapes
    from bench_recipe_memory import make_long_rows
    from distillm_tune.scripts.make_tiny_assets import make_tiny_assets

    work = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    shapes = {}
    for shape in ("tiny", "gpt2"):
        assets = os.path.join(work, f"assets_{shape}")
        make_tiny_assets(assets, train=96, valid=8, test=8)
        if shape == "gpt2" and not dry:
            make_gpt2_shapes(assets)
        seq = 96 if shape == "tiny" else args.seq_len
        make_long_rows(os.path.join(assets, "data", "long.jsonl"), os.path.join(assets, "student"), rows=ROWS,
                       prompt_tokens=seq * 2 // 3 - 4, response_tokens=seq - seq * 2 // 3 - 4)
        shapes[shape] = (assets, seq)

    results = []
    for shape, steps in (("tiny", args.tiny_steps), ("gpt2", args.gpt2_steps)):
        assets, seq = shapes[shape]
        batch = 8 if shape == "tiny" else args.batch_size
        runs = {}
        for precision, path, ref in (("fp32", "logits", None), ("mixed-bf16", "logits", ("fp32", "logits")),
                                     ("mixed-bf16", "fused", ("mixed-bf16", "logits"))):
            r = recipe_case(device, assets, os.path.join(work, f"{shape}_{precision}_{path}"), shape, precision,
                            path, steps, seq, batch)
            runs[(precision, path)] = r
            row = {"case": "recipe", "shape": shape if not (shape == "gpt2" and dry) else "gpt2 (dry: tiny)",
                   "precision": precision, "path": path, "steps": len(r["rows"]), "s_per_step": r["step_s"],
                   "tokens_per_s": r["tok_s"], "peak_gib": r["peak"], "final_loss": r["rows"][-1]["loss"]}
            if ref is not None:
                base = runs[ref]
                row["max_rel_dev"], row["final_rel_dev"] = _rel_dev(r["rows"], base["rows"])
                row["vs"] = f"{ref[0]} {ref[1]}"
                row["peak_x"] = None if r["peak"] is None else r["peak"] / base["peak"]
                row["time_x"] = r["step_s"] / base["step_s"]
            results.append(row)
            print(f"  {row}", file=sys.stderr, flush=True)

    gen, gen_dtype = generation_case(device, small=dry, repeats=1 if dry else 5, new_tokens=8 if dry else 128)
    for k, label in (("hf", "transformers generate"), ("ours", "generate_responses")):
        results.append({"case": "generate", "shape": "gpt2-small" if not dry else "gpt2 2x128 (dry)",
                        "precision": gen_dtype, "path": label, "tokens_per_s": gen[k]["tok_s"],
                        "peak_gib": gen[k]["peak"], "time_x": gen["hf"]["tok_s"] / gen[k]["tok_s"],
                        "x_hf_per_round": gen[k]["per_round"], "vs": "transformers generate"})

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    print(f"\ngpu_check on {device}{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}"
          f"{' -- DRY RUN: tiny shapes, figures mean nothing' if dry else ''}; torch {torch.__version__}; "
          f"seq_len {args.seq_len}, batch {args.batch_size} (gpt2), tiny batch 8; {time.perf_counter() - t_start:.0f} s")
    header = ("| case | shape | precision | loss path / generator | steps | s/step | tokens/s | peak GiB | final loss "
              "| vs | max rel dev | final rel dev | x time | x peak |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in results:
        print(f"| {r['case']} | {r['shape']} | {r['precision']} | {r['path']} | {r.get('steps', '-')} "
              f"| {f(r.get('s_per_step'), '.3f')} | {f(r['tokens_per_s'], '.0f')} | {f(r['peak_gib'], '.2f')} "
              f"| {f(r.get('final_loss'), '.5f')} | {r.get('vs', '-')} | {f(r.get('max_rel_dev'), '.2e')} "
              f"| {f(r.get('final_rel_dev'), '.2e')} | {f(r.get('time_x'), '.2f')} | {f(r.get('peak_x'), '.2f')} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": str(device), "dry_run": dry, "rows": results}, fh, indent=1)


if __name__ == "__main__":
    main()
