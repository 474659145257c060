"""Peak memory and forward+backward time of a KD loss over a language-model head.

Compares, in one run and on the same inputs, four ways to compute the divergence between a
student and a teacher over ``tokens`` positions and a vocabulary of ``V``:

  (a) dense     logits of both models materialised as [tokens, V], then the divergence (baseline)
  (b) tt-chunk  torchtune's ForwardKLWithChunkedOutputLoss over 8 logits chunks (FKL only)
  (c) chunked   this project's divergence over the same 8 logits chunks
  (d) fused     this project's FusedLinearDivergence from hidden states (no [tokens, V] tensor)

Each case runs in a fresh subprocess; peak memory is the growth of the peak resident set size
over what the inputs already occupy (CPU) or ``torch.cuda.max_memory_allocated`` growth (GPU).
Times are the median of ``--repeats`` runs after ``--warmup`` warm-ups.

    python benchmarks/bench_losses.py                 # the issue's grid: V 32000/50257, H 768/1600
    python benchmarks/bench_losses.py --quick         # a small grid, seconds
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CASES = ("dense", "tt-chunk", "chunked", "fused")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_case(case, vocab, hidden, tokens, divergence, warmup, repeats, device, chunk_size, num_chunks):
    """Runs in the subprocess: one case, prints a JSON line."""
    import torch
    from torch.nn import functional as F
    from torchtune.modules.loss import ForwardKLWithChunkedOutputLoss

    from distillm_tune.losses import FusedLinearDivergence, get_divergence

    torch.manual_seed(0)
    dev = torch.device(device)
    h_s = torch.randn(tokens, hidden, device=dev)
    # in place, so that building the inputs does not raise the peak above what they occupy
    w_s = torch.randn(vocab, hidden, device=dev).div_(hidden**0.5).requires_grad_(True)
    h_t = torch.randn(tokens, hidden, device=dev)
    w_t = torch.randn(vocab, hidden, device=dev).div_(hidden**0.5)
    labels = torch.randint(0, vocab, (tokens,), device=dev)
    labels[: tokens // 10] = -100  # a prompt's worth of masked positions
    div = get_divergence(divergence)
    fused = FusedLinearDivergence(div, chunk_size=chunk_size)
    tt_fkl = ForwardKLWithChunkedOutputLoss(num_output_chunks=num_chunks)

    def step(tokens=tokens):
        hs = h_s[-tokens:].clone().requires_grad_(True)
        h_t_, labels_ = h_t[-tokens:], labels[-tokens:]
        if case == "dense":
            s = hs @ w_s.t()
            with torch.no_grad():
                t = h_t_ @ w_t.t()
            loss = div(s, t, labels_)
        elif case in ("tt-chunk", "chunked"):
            # torchtune's chunked-output convention: [1, tokens / k, V] chunks of a [1, tokens] batch
            s = [F.linear(c, w_s) for c in hs.unsqueeze(0).chunk(num_chunks, dim=1)]
            with torch.no_grad():
                t = [F.linear(c, w_t) for c in h_t_.unsqueeze(0).chunk(num_chunks, dim=1)]
            loss = (tt_fkl if case == "tt-chunk" else div)(s, t, labels_.unsqueeze(0))
        else:
            loss = fused(hs, w_s, h_t_, w_t, labels_)
        loss.backward()
        w_s.grad = None
        return float(loss.detach())

    # Baseline: the inputs in memory. A 16-token warm-up then loads kernels; its own peak (the
    # weight gradient) stays below a full step's, so peak growth over the baseline is the step's.
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_bytes()
    step(tokens=16)
    times, value = [], None
    # Several warm-ups: the allocator's first large allocations page-fault (glibc raises its
    # mmap threshold only after a few frees), which would otherwise penalise whichever case
    # allocates the most distinct buffer sizes.
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        value = step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss_bytes() - base
    print(json.dumps({"peak": peak, "time": statistics.median(times), "loss": value}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[32000, 50257])
    ap.add_argument("--hidden", type=int, nargs="+", default=[768, 1600])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--divergence", default="srkl", help="fkl, rkl, skl, srkl, jsd, tvd, iskl")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-size", type=int, default=512, help="tokens per chunk of the fused path")
    ap.add_argument("--num-chunks", type=int, default=8, help="logits chunks of (b) and (c)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="V 8000, H 256, 1024 tokens")
    ap.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.case:
        run_case(args.case, args.vocab[0], args.hidden[0], args.tokens, args.divergence,
                 args.warmup, args.repeats, args.device, args.chunk_size, args.num_chunks)
        return
    if args.quick:
        args.vocab, args.hidden, args.tokens = [8000], [256], 1024

    print(f"divergence={args.divergence} tokens={args.tokens} device={args.device} "
          f"fused chunk={args.chunk_size} tokens, logits chunks={args.num_chunks}; "
          "ratios are to (a) dense in the same run")
    header = f"| {'V':>6} | {'H':>5} | {'case':<9} | {'peak MiB':>9} | {'x dense':>7} | {'time s':>7} | {'x dense':>7} | {'loss':>9} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for vocab in args.vocab:
        for hidden in args.hidden:
            results = {}
            for case in CASES:
                cmd = [sys.executable, __file__, "--case", case, "--vocab", str(vocab), "--hidden", str(hidden),
                       "--tokens", str(args.tokens), "--divergence", args.divergence, "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                       "--device", args.device, "--chunk-size", str(args.chunk_size), "--num-chunks", str(args.num_chunks)]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                results[case] = json.loads(out.strip().splitlines()[-1])
                r, d = results[case], results["dense"]
                note = " (FKL)" if case == "tt-chunk" else ""
                print(f"| {vocab:>6} | {hidden:>5} | {case:<9} | {r['peak'] / 2**20:>9.0f} | {r['peak'] / d['peak']:>7.2f} "
                      f"| {r['time']:>7.2f} | {r['time'] / d['time']:>7.2f} | {r['loss']:>9.4f} |{note}", flush=True)


if __name__ == "__main__":
    main()
