"""One decoding matrix product on CPU: ``F.linear`` (the baseline) vs the MKL-packed weight that
``distillm_tune.generation.mkl_packed_linears`` installs during generation, vs oneDNN.

The weights have SmolLM2-135M-Instruct's shapes (``--shapes smollm2``) or GPT-2-small's
(``--shapes gpt2``); the inputs have the row counts of a decode step with 16 rows, some of them
finished and dropped (``--rows``). Median of ``torch.utils.benchmark`` over at least
``--min-run-time`` seconds each, hot weights, with torch's thread count (or ``--threads``).

    python benchmarks/bench_packed_linear.py                      # SmolLM2 shapes, rows 8 12 16
    python benchmarks/bench_packed_linear.py --shapes gpt2 --rows 1 8
"""

import argparse
import os
import platform
import time

import torch
import torch.nn.functional as F
from torch.utils import benchmark

from distillm_tune.generation import _mkl_packing_available, _packed_linear

SHAPES = {  # name: (out_features, in_features)
    "smollm2": {"q, output 576x576": (576, 576), "k, v 192x576": (192, 576), "gate, up 1536x576": (1536, 576),
                "down 576x1536": (576, 1536), "tied head 49152x576": (49152, 576)},
    "gpt2": {"qkv 2304x768": (2304, 768), "attn out 768x768": (768, 768), "fc 3072x768": (3072, 768),
             "proj 768x3072": (768, 3072), "tied head 50257x768": (50257, 768)},
}


def median_us(fn, threads, min_run_time):
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 12, 16])
    ap.add_argument("--pack-rows", type=int, default=16, help="the row count the weights are packed for")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--min-run-time", type=float, default=0.3)
    args = ap.parse_args()
    if not _mkl_packing_available():
        raise SystemExit("this torch build has no MKL: nothing to compare")
    torch.manual_seed(0)
    print(f"machine: nproc={os.cpu_count()} torch={torch.__version__} threads={args.threads} "
          f"python={platform.python_version()}; load average {os.getloadavg()[0]:.2f}")
    print(f"shapes: {args.shapes}, packed for {args.pack_rows} rows; µs per product (median), fp32\n")
    print("| weight | rows | F.linear | MKL packed | x F.linear | oneDNN | x F.linear | pack ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    with torch.no_grad():
        for name, (out_f, in_f) in SHAPES[args.shapes].items():
            w = torch.randn(out_f, in_f)
            t0 = time.perf_counter()
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, args.pack_rows)
            pack_ms = (time.perf_counter() - t0) * 1e3
            for rows in args.rows:
                x = torch.randn(rows, in_f)
                torch.testing.assert_close(_packed_linear(packed, w, None, x), F.linear(x, w), rtol=1e-4, atol=1e-4)
                plain = median_us(lambda: F.linear(x, w), args.threads, args.min_run_time)
                mkl = median_us(lambda: _packed_linear(packed, w, None, x), args.threads, args.min_run_time)
                dnn = median_us(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""),
                                args.threads, args.min_run_time)
                print(f"| {name} | {rows} | {plain:.0f} | {mkl:.0f} | {plain / mkl:.2f} | {dnn:.0f} | "
                      f"{plain / dnn:.2f} | {pack_ms:.1f} |")


if __name__ == "__main__":
    main()
