"""Tokens/s of student generation: transformers' ``generate`` vs this project's sampler.

One GPT-2-small-shaped model with random weights (12 layers, 768 wide, 12 heads, vocabulary 50257,
1024 positions; ``--small``: 2 layers, 128 wide) is saved with ``save_pretrained`` and loaded back
with ``distillm_tune.models.hf.load_hf``, so every contender runs the same weights. A batch of
``--batch`` prompts of varying real lengths (``--min-prompt-len`` .. ``--prompt-len``, left-padded
to ``--prompt-len``) is extended by exactly ``--new-tokens`` sampled tokens (temperature 1.0,
top-p 1.0, no top-k) by

  (1) hf        transformers ``model.generate(do_sample=True, min_new_tokens=max_new_tokens, ...)``
                on ``GPT2LMHeadModel`` (the baseline)
  (2) ours      ``distillm_tune.sgo.sampler.generate_responses`` on the ported model, with an EOS id
                outside the vocabulary (so every row runs to ``--new-tokens``)
  (3) tt        torchtune's stock ``torchtune.generation.generate`` on the ported model (KV caches
                set up around the call; it keeps fp32 logits of every step)
  (2') ours_plain (2) with ``pack_weights=False``: ``F.linear`` instead of MKL-packed weights on CPU
                (not run unless named in ``--contenders``)

(2) samples by inverse CDF (``distillm_tune.generation.sample_next_token``) since the prototype
contender that measured that change was adopted (docs/benchmarks.md §2).

Every contender generates the same number of tokens (checked). Contenders are interleaved
(1 2 3, 3 2 1, ...) over ``--repeats`` rounds after ``--warmup`` rounds, and the median time is
reported, so load from other processes hits all of them alike; "x tf per round" is the median over
rounds of (transformers' time / the contender's time in the same round), which also cancels load
that drifts between rounds. Tokens/s counts generated tokens across the batch
(``batch * new_tokens``) per second of the whole call (prompt pass included).
Peak memory is ``torch.cuda.max_memory_allocated`` growth over the resident model on GPU; on CPU it
is left out unless ``--cpu-memory`` (one subprocess per contender after the timing: peak RSS growth
of one call after a warm-up call, see ``_cpu_peak_growth``).

    python benchmarks/bench_generation.py                  # GPT-2-small shape, fp32, CPU
    python benchmarks/bench_generation.py --small          # 2 layers x 128: seconds
    python benchmarks/bench_generation.py --device cuda --dtype bf16
    python benchmarks/bench_generation.py --small --profile ours   # torch.profiler op table
    python benchmarks/bench_generation.py --smollm2 --batch 16 --new-tokens 64   # a real checkpoint

``--smollm2``: SmolLM2-135M-Instruct (GQA 9/3 heads, tied head; ``get_smollm2``'s cached
conversion) on chat-template prompts of varying length, greedy, every row stopping at its first
stop id (``<|im_end|>``) or after ``--new-tokens``: transformers' ``generate`` on
``AutoModelForCausalLM`` vs ``generate_responses`` on the torchtune-native model, with the same
prompts and the same stopping, and (2') ``generate_responses(..., pack_weights=False)``
(``F.linear`` instead of MKL-packed weights). Tokens/s counts each contender's own generated tokens
(greedy: the same up to floating-point ties; the counts are printed). ``--cpu-memory`` adds each
contender's peak RSS growth over one call, measured in this process after the timing.
"""

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

CONTENDERS = ("hf", "ours", "tt", "ours_plain")
LABELS = {
    "hf": "(1) transformers generate",
    "ours": "(2) generate_responses",
    "tt": "(3) torchtune generate",
    "ours_plain": "(2') generate_responses, F.linear",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------- setup


def build_models(args, device, dtype):
    """(HF model, ported torchtune model) with identical weights, both in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from distillm_tune.models.hf import load_hf

    if args.small:
        shape = dict(n_layer=2, n_embd=128, n_head=4)
    else:
        shape = dict(n_layer=12, n_embd=768, n_head=12)
    config = GPT2Config(vocab_size=args.vocab, n_positions=1024, **shape)
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        tt = load_hf(tmp, dtype=dtype)
    hf = hf.to(device=device, dtype=dtype).eval()
    tt = tt.to(device=device).eval()
    return hf, tt, config


@torch.no_grad()
def max_logit_diff(hf, tt, args, device) -> float:
    """Largest |logit| difference of the two models on one unpadded prompt (same weights check)."""
    ids = torch.tensor([make_prompts(args)[-1]], device=device)
    return (hf(input_ids=ids).logits.float() - tt(ids).float()).abs().max().item()


def make_prompts(args):
    """Token lists of lengths spread over [min_prompt_len, prompt_len]; ids avoid the pad id."""
    g = torch.Generator().manual_seed(1)
    lens = torch.linspace(args.min_prompt_len, args.prompt_len, args.batch).round().long().tolist()
    # pad = GPT-2's EOS (50256, the last id); torchtune's generate finds padding as ``!= pad_id``
    return [torch.randint(0, args.vocab - 1, (n,), generator=g).tolist() for n in lens]


def left_pad(prompts, pad_id, device):
    plen = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), plen), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), plen), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, plen - len(p):] = torch.tensor(p)
        attn[i, plen - len(p):] = 1
    return ids.to(device), attn.to(device)


# ----------------------------------------------------------------------------- contenders


def make_runners(args, hf, tt, device, dtype):
    from torchtune.generation import generate as tt_generate
    from torchtune.modules.common_utils import local_kv_cache

    from distillm_tune.sgo.sampler import generate_responses

    pad_id = args.vocab - 1
    prompts = make_prompts(args)
    ids, attn = left_pad(prompts, pad_id, device)
    n = args.new_tokens
    never_eos = [args.vocab]  # outside the vocabulary: can never be sampled
    gen = torch.Generator(device=device).manual_seed(2)

    def run_hf():
        out = hf.generate(
            input_ids=ids, attention_mask=attn, do_sample=True, max_new_tokens=n, min_new_tokens=n,
            temperature=1.0, top_p=1.0, top_k=0, pad_token_id=pad_id, eos_token_id=pad_id,
        )
        return out.shape[0] * (out.shape[1] - ids.shape[1])

    def run_ours(pack_weights=True):
        res = generate_responses(tt, prompts, max_new_tokens=n, eos_ids=never_eos, pad_id=pad_id,
                                 temperature=1.0, top_p=1.0, generator=gen, pack_weights=pack_weights)
        return sum(len(r["response"]) for r in res)

    def run_tt():
        with local_kv_cache(tt, batch_size=ids.shape[0], device=device, dtype=dtype,
                            decoder_max_seq_len=ids.shape[1] + n):
            out, _logits = tt_generate(tt, ids, max_generated_tokens=n, pad_id=pad_id,
                                       temperature=1.0, rng=gen)
        return out.shape[0] * (out.shape[1] - ids.shape[1])

    return {"hf": run_hf, "ours": run_ours, "tt": run_tt, "ours_plain": lambda: run_ours(pack_weights=False)}


# ----------------------------------------------------------------------------- measurement


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field + ":"))


def _cpu_peak_growth(fn) -> int:
    """Peak resident set growth (bytes) during ``fn()`` over the resident set before it.

    Freed heap memory is first handed back to the OS (``malloc_trim``) so that the call cannot
    hide its peak in pages a previous call left resident; the high-water mark is reset through
    ``/proc/self/clear_refs`` so that model loading does not count.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    fn()
    return max(0, _status_kib("VmHWM") - base) * 1024


def time_interleaved(runners, names, device, warmup, repeats):
    times = {k: [] for k in names}
    peaks = {k: 0 for k in names}
    counts = {}
    for r in range(warmup + repeats):
        # A B C D, D C B A, ...: a load trend within a round does not favour a fixed position
        for k in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            if device.type == "cuda":
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            counts[k] = runners[k]()
            _sync(device)
            dt = time.perf_counter() - t0
            if device.type == "cuda":
                peaks[k] = max(peaks[k], torch.cuda.max_memory_allocated() - base)
            if r >= warmup:
                times[k].append(dt)
            print(f"  round {r}{' (warm-up)' if r < warmup else ''} {k:<5} {dt:7.3f} s "
                  f"load {os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    return times, peaks, counts


def profile(runner, device, rows):
    from torch.profiler import ProfilerActivity, profile as tprofile

    runner()  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with tprofile(activities=acts) as prof:
        runner()
        _sync(device)
    key = "device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows))


def machine_line(args):
    cpu = "?"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
    import transformers
    import torchtune

    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    return (f"nproc={os.cpu_count()} cpu={cpu!r}{gpu} torch={torch.__version__} "
            f"torch threads={torch.get_num_threads()} transformers={transformers.__version__} "
            f"torchtune={torchtune.__version__} python={platform.python_version()}")


def smollm2_case(args):
    """Real checkpoint, early stopping (module docstring, ``--smollm2``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillm_tune.models import load_hf, load_hf_tokenizer
    from distillm_tune.models.tokenizer import stop_ids
    from distillm_tune.scripts.get_smollm2 import get_smollm2
    from distillm_tune.sgo.sampler import generate_responses

    path = get_smollm2(os.path.expanduser("~/.cache/distillm_tune/smollm2-135m-instruct"))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_hf(path).eval()
    hf_tok, tok = AutoTokenizer.from_pretrained(path), load_hf_tokenizer(path)
    questions = ["Name a fruit.", "What is 7 plus 5?", "Write one sentence about the sea.",
                 "List three colours, separated by commas.", "Explain in two sentences why the sky is blue.",
                 "Translate 'good morning' into French.", "Give a synonym of happy.",
                 "Describe a cat in one short paragraph."]
    prompts = [hf_tok.apply_chat_template([{"role": "user", "content": questions[i % len(questions)]}],
                                          add_generation_prompt=True, tokenize=True) for i in range(args.batch)]
    prompts = [list(p["input_ids"] if isinstance(p, dict) or hasattr(p, "keys") else p) for p in prompts]
    eos, pad = sorted(stop_ids(tok)), tok.pad_id
    longest = max(map(len, prompts))
    ids = torch.full((len(prompts), longest), pad)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):], attn[i, longest - len(p):] = torch.tensor(p), 1

    def run_hf():
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=attn, do_sample=False, max_new_tokens=args.new_tokens,
                              eos_token_id=eos, pad_token_id=pad)[:, longest:].tolist()
        return sum(next((i + 1 for i, t in enumerate(row) if t in eos), len(row)) for row in out)

    def run_ours(pack_weights=True):
        res = generate_responses(ours, prompts, max_new_tokens=args.new_tokens, eos_ids=eos, pad_id=pad,
                                 temperature=0.0, pack_weights=pack_weights)
        return sum(len(r["response"]) for r in res)

    runners = {"hf": run_hf, "ours": run_ours, "ours_plain": lambda: run_ours(pack_weights=False)}
    names = ["hf", "ours", "ours_plain"]
    times, _, counts = time_interleaved(runners, names, torch.device("cpu"), args.warmup, args.repeats)
    peaks = {k: _cpu_peak_growth(runners[k]) for k in names} if args.cpu_memory else {}
    print(f"model: SmolLM2-135M-Instruct (30 layers x 576, 9 query / 3 key-value heads, tied head, V=49152); "
          f"batch {args.batch} chat prompts of {min(map(len, prompts))}..{longest} tokens, greedy, stop at "
          f"{eos} or {args.new_tokens} new tokens; cpu fp32")
    print(f"machine: {machine_line(args)}; load average now {os.getloadavg()[0]:.2f}")
    print(f"generated tokens per call: transformers {counts['hf']}, ours {counts['ours']}, "
          f"ours with F.linear {counts['ours_plain']} (of {args.batch * args.new_tokens} at most)\n")
    mem_h = " peak RSS growth MiB |" if peaks else ""
    print(f"| contender | median s | tokens/s | x transformers | x tf per round |{mem_h}")
    print("|---|---:|---:|---:|---:|" + ("---:|" if peaks else ""))
    base = statistics.median(times["hf"])
    for k in names:
        med = statistics.median(times[k])
        per_round = statistics.median((counts[k] / t) / (counts["hf"] / h) for h, t in zip(times["hf"], times[k]))
        mem = f" {peaks[k] / 2**20:.0f} |" if peaks else ""
        print(f"| {LABELS[k]} | {med:.3f} | {counts[k] / med:.1f} | {(counts[k] / med) / (counts['hf'] / base):.2f} "
              f"| {per_round:.2f} |{mem}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="2 layers x 128 wide, 4 heads (quick)")
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=64, help="padded prompt length (longest prompt)")
    ap.add_argument("--min-prompt-len", type=int, default=40, help="shortest real prompt")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice); "
                    "1 avoids OpenMP barrier stalls when other processes hold the cores")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=["hf", "ours", "tt"])
    ap.add_argument("--profile", choices=CONTENDERS, help="print a torch.profiler table for one contender")
    ap.add_argument("--profile-rows", type=int, default=25)
    ap.add_argument("--cpu-memory", action="store_true",
                    help="CPU: also measure peak RSS growth, one subprocess per contender")
    ap.add_argument("--memory-case", choices=CONTENDERS, help=argparse.SUPPRESS)
    ap.add_argument("--smollm2", action="store_true", help="the real-checkpoint case (see the module docstring)")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smollm2:
        return smollm2_case(args)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    hf, tt, config = build_models(args, device, dtype)
    runners = make_runners(args, hf, tt, device, dtype)

    if args.memory_case:  # subprocess of --cpu-memory: one warm-up, then the measured call
        runners[args.memory_case]()
        print(json.dumps({"peak": _cpu_peak_growth(runners[args.memory_case])}))
        return
    if args.profile:
        profile(runners[args.profile], device, args.profile_rows)
        return

    names = list(args.contenders)
    if "hf" not in names:
        names.insert(0, "hf")
    diff = max_logit_diff(hf, tt, args, device)
    load_before = os.getloadavg()
    times, peaks, counts = time_interleaved(runners, names, device, args.warmup, args.repeats)
    load_after = os.getloadavg()
    expected = args.batch * args.new_tokens
    bad = {k: c for k, c in counts.items() if c != expected}
    if bad:
        raise RuntimeError(f"unequal generated token counts (expected {expected}): {bad}")
    if device.type != "cuda" and args.cpu_memory:
        for k in names:
            cmd = [sys.executable, __file__, "--memory-case", k] + [a for a in sys.argv[1:] if a != "--cpu-memory"]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            peaks[k] = json.loads(out.strip().splitlines()[-1])["peak"]
    show_mem = device.type == "cuda" or args.cpu_memory

    shape = f"{config.n_layer} layers x {config.n_embd}, {config.n_head} heads, V={config.vocab_size}"
    print(f"model: GPT-2 ({shape}), random weights; batch {args.batch}, prompts "
          f"{args.min_prompt_len}..{args.prompt_len} tokens left-padded to {args.prompt_len}, "
          f"{args.new_tokens} new tokens/row sampled (T=1, top_p=1); {args.device} {args.dtype}")
    print(f"same weights: max |logit difference| transformers vs ported model = {diff:.2e}")
    print(f"machine: {machine_line(args)}")
    print(f"load average (1/5/15 min): before {'/'.join(f'{x:.2f}' for x in load_before)}, "
          f"after {'/'.join(f'{x:.2f}' for x in load_after)}")
    print(f"median of {args.repeats} interleaved rounds after {args.warmup} warm-up; "
          f"{expected} generated tokens per call; ratios are to (1) in the same run")
    print()
    mem_h = " peak MiB |" if show_mem else ""
    width = max(len(LABELS[k]) for k in names)
    header = (f"| {'contender':<{width}} | {'median s':>8} | {'min s':>6} | {'tokens/s':>8} "
              f"| {'x transformers':>14} | {'x tf per round':>14} |{mem_h}")
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    base = statistics.median(times["hf"])
    for k in names:
        med = statistics.median(times[k])
        # each round's contenders ran back to back, so the per-round ratio cancels slow load drift
        per_round = statistics.median(h / t for h, t in zip(times["hf"], times[k]))
        mem = f" {peaks[k] / 2**20:>8.0f} |" if show_mem else ""
        print(f"| {LABELS[k]:<{width}} | {med:>8.3f} | {min(times[k]):>6.3f} | {expected / med:>8.1f} "
              f"| {base / med:>14.2f} | {per_round:>14.2f} |{mem}")


if __name__ == "__main__":
    main()
