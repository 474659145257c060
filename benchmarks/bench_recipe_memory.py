"""Peak memory and step time of ``kd_offpolicy`` with the KD loss over logits (the default) and with
``fused_loss_chunk_size`` (hidden states + head weights, no ``[tokens, V]`` logits), same run.

    python benchmarks/bench_recipe_memory.py                     # GPT-2-small student, GPT-2-medium teacher
    python benchmarks/bench_recipe_memory.py --small             # tiny models, seconds (smoke run)
    python benchmarks/bench_recipe_memory.py --nproc 2 --threads 1             # 2 FSDP2 ranks
    python benchmarks/bench_recipe_memory.py --nproc 2 --threads 1 --student medium --steps 2

``--nproc N`` launches each mode with torchrun (FSDP2, ``--batch-size`` is the global batch, split
over the ranks); every rank reports its own peak RSS, the table shows the largest and the sum.

Each mode runs in its own subprocess (peak resident memory is per process): ``method=kd`` (no
generation, so both modes see the same batches), batch ``--batch-size`` of rows whose prompt +
response fill about ``--seq-len`` tokens, ``--steps`` optimizer steps. Reported: the process's peak
RSS (``ru_maxrss``), the peak of the training steps alone (``VmHWM`` reset after setup, read
before the export), the mean step time without the first step, and the step-1 loss of both modes
(they must agree: same computation, different order of work). Baseline: ``logits``.
"""

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)


def make_long_rows(path: str, tokenizer_dir: str, rows: int, prompt_tokens: int, response_tokens: int,
                   seed: int = 0) -> None:
    """Dolly rows of random words whose prompt (template included) and response come close to the
    given token budgets with the assets' tokenizer, so the sequences are long whatever the task."""
    from distillm_tune.data.instruction import format_prompt
    from distillm_tune.models import load_hf_tokenizer

    tok = load_hf_tokenizer(tokenizer_dir)
    rng = random.Random(seed)
    vocab = "door pig cherry dog black green lamp owl blue bat sun lime red cat tree fox".split()

    def words(n):
        return " ".join(rng.choice(vocab) for _ in range(n))

    def n_tokens(text):
        return len(tok.encode(text, add_bos=False, add_eos=False))

    per_word = n_tokens(words(400)) / 400
    instruction = "Repeat some of the words."
    template = len(tok.encode(format_prompt(instruction, "x"), add_bos=True, add_eos=False))
    ctx_words = max(4, int((prompt_tokens - template) / per_word * 0.9))
    resp_words = max(2, int((response_tokens - 2) / per_word * 0.9))
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"instruction": instruction, "context": words(ctx_words),
                                "response": words(resp_words), "category": "bench"}) + "\n")


def vm_hwm_mib() -> float:
    """Peak resident memory since the last ``clear_refs`` reset (``VmHWM``), MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def child(args) -> None:
    import torch

    from distillm_tune.scripts.demo import run

    torch.set_num_threads(args.threads)
    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    over = [f"assets_dir={args.assets}", f"output_dir={args.out}", "method=kd", "epochs=1",
            f"max_steps_per_epoch={args.steps}", f"batch_size={args.batch_size // nproc}", "validation.max_examples=8",
            f"max_seq_len={args.seq_len}", f"max_prompt_len={args.seq_len * 2 // 3}", "log_every_n_steps=1",
            "save_every_n_steps=null", f"dataset.source={args.assets}/data/long.jsonl",
            f"validation.dataset.source={args.assets}/data/long.jsonl"]
    if args.mode == "fused":
        over.append(f"fused_loss_chunk_size={args.chunk}")
    over.append(f"kd_ratio={args.kd_ratio}")
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    # The training steps' own peak: VmHWM reset (Linux clear_refs 5) when setup is done (model
    # loading, sharding) and read before the export (FSDP gathers the full weights for it).
    steps_peak = {}
    setup, export = KDOffPolicyRecipe.setup, KDOffPolicyRecipe.export

    def setup_then_reset(self):
        setup(self)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def export_after_reading(self, *a, **k):
        steps_peak["mib"] = vm_hwm_mib()
        return export(self, *a, **k)

    KDOffPolicyRecipe.setup, KDOffPolicyRecipe.export = setup_then_reset, export_after_reading
    rows = run(args.mode, args.out, over)["rows"]  # rank 0 writes the metrics; every rank has its own peak
    out = {"rank": int(os.environ.get("RANK", "0")), "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "steps_peak_mib": steps_peak["mib"]}
    if out["rank"] == 0:
        out.update(step_s=statistics.mean(r["step_time"] for r in rows[1:]), loss1=rows[0]["loss"],
                   loss_ce1=rows[0]["loss_ce"], tokens=rows[0]["tokens_per_sec"] * rows[0]["step_time"])
    print("RESULT " + json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny models instead of GPT-2 shapes")
    ap.add_argument("--seq-len", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=1024, help="fused_loss_chunk_size")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--nproc", type=int, default=1, help="processes (FSDP2 ranks) per run, via torchrun")
    ap.add_argument("--student", choices=["small", "medium"], default="small", help="student's GPT-2 shape")
    ap.add_argument("--kd-ratio", type=float, default=1.0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--assets", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    from distillm_tune.scripts.make_tiny_assets import make_tiny_assets

    work = tempfile.mkdtemp(prefix="bench_recipe_memory_")
    assets = os.path.join(work, "assets")
    make_tiny_assets(assets, train=64, valid=8, test=8)
    if not args.small:
        from bench_methods import make_gpt2_shapes

        make_gpt2_shapes(assets, student=args.student)
    make_long_rows(os.path.join(assets, "data", "long.jsonl"), os.path.join(assets, "student"), rows=64,
                   prompt_tokens=args.seq_len * 2 // 3, response_tokens=args.seq_len - args.seq_len * 2 // 3)
    if args.batch_size % args.nproc:
        ap.error(f"--batch-size {args.batch_size} must split evenly over --nproc {args.nproc}")
    shape = "tiny" if args.small else f"GPT-2-{args.student} student / GPT-2-medium teacher, V=50257"
    print(f"{shape}; global batch {args.batch_size} on {args.nproc} process(es), max_seq_len {args.seq_len}, "
          f"{args.steps} steps, method=kd, kd_ratio {args.kd_ratio}, fp32, {args.threads} threads per process, "
          f"fused chunk {args.chunk}", flush=True)
    res = {}
    for mode in ("logits", "fused"):
        launch = [sys.executable]
        if args.nproc > 1:
            launch += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.nproc)]
        cmd = launch + [__file__, "--child", "--mode", mode, "--assets", assets,
               "--out", os.path.join(work, mode), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
               "--seq-len", str(args.seq_len), "--chunk", str(args.chunk), "--threads", str(args.threads),
               "--kd-ratio", str(args.kd_ratio)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        ranks = [json.loads(x[len("RESULT "):]) for x in p.stdout.splitlines() if x.startswith("RESULT ")]
        if p.returncode != 0 or len(ranks) != args.nproc:
            sys.exit(f"{mode} run failed:\n{p.stderr[-3000:]}")
        peaks = [r["peak_mib"] for r in sorted(ranks, key=lambda r: r["rank"])]
        steps = [r["steps_peak_mib"] for r in sorted(ranks, key=lambda r: r["rank"])]
        res[mode] = dict(next(r for r in ranks if r["rank"] == 0), peak_mib=max(peaks), peak_sum_mib=sum(peaks),
                         steps_peak_mib=max(steps), steps_peak_sum_mib=sum(steps))
        print(f"{mode}: peak RSS per rank (MiB) {[round(x) for x in peaks]}, training steps only "
              f"{[round(x) for x in steps]}", flush=True)
    base = res["logits"]
    print(f"\nloss tokens in step 1: {res['logits']['tokens']:.0f}\n")
    many = args.nproc > 1
    print(f"| loss path | peak RSS MiB{' (largest rank) | sum over ranks' if many else ''} | x logits | steps-only "
          f"peak MiB{' (largest rank) | sum over ranks' if many else ''} | x logits | s / step | x logits "
          "| step-1 loss | step-1 CE |")
    print("|---|" + "---:|" * (9 + 2 * many))
    for mode, r in res.items():
        whole = f"{r['peak_mib']:.0f} |" + (f" {r['peak_sum_mib']:.0f} |" if many else "")
        steps = f"{r['steps_peak_mib']:.0f} |" + (f" {r['steps_peak_sum_mib']:.0f} |" if many else "")
        print(f"| {mode} | {whole} {r['peak_mib'] / base['peak_mib']:.2f} | {steps} "
              f"{r['steps_peak_mib'] / base['steps_peak_mib']:.2f} | {r['step_s']:.2f} | "
              f"{r['step_s'] / base['step_s']:.2f} | {r['loss1']:.6f} | {r['loss_ce1']:.6f} |")


if __name__ == "__main__":
    main()
