"""Rank-0 peak memory while a checkpoint is written: the full gather of model and optimizer state on
rank 0 (the checkpoint format before DCP) vs every rank writing its own shards with
torch.distributed.checkpoint (``RecipeCheckpointer.save``, what ``kd_offpolicy`` does now).

    python benchmarks/bench_checkpoint_memory.py              # GPT-2-small student, 2 processes, CPU/gloo
    python benchmarks/bench_checkpoint_memory.py --small      # tiny shape, seconds (smoke run)

Each mode runs in its own ``torchrun --nproc_per_node 2`` launch (peak resident memory is per
process). In each rank: the student built as the recipe builds it (our GPT-2 port, fp32), sharded
with FSDP2 per layer as the recipe shards it, AdamW stepped once on random gradients (so the
optimizer holds its two moments), then the peak RSS high-water mark is reset
(``/proc/self/clear_refs`` = 5) and one checkpoint is written:

* ``gather``: ``training.gather_cpu_state_dict`` and ``training.get_full_optimizer_state_dict`` to
  rank 0, ``torch.save`` of both there (the code of ``save_checkpoint`` before DCP);
* ``dcp``: ``get_state_dict`` (this rank's shards) and ``RecipeCheckpointer.save`` (DCP, manifest,
  atomic rename).

Reported per rank: RSS before the save, peak RSS during it (``VmHWM`` after the reset) and the
difference, and the save's wall time; plus the size of what was written.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

GPT2_SMALL = {"vocab_size": 50257, "n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}
TINY = {"vocab_size": 512, "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: VmHWM := current RSS
        f.write("5")


def worker(mode: str, shape: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    from torchtune import training

    from distillm_tune.models.gpt2 import gpt2_from_hf_config
    from distillm_tune.training.checkpointing import RecipeCheckpointer
    from distillm_tune.training.model_io import LAYER_CLASSES

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = gpt2_from_hf_config({**shape, "attn_pdrop": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0})
    training.shard_model(model, [lambda name, m: isinstance(m, LAYER_CLASSES)], cpu_offload=False,
                         reshard_after_forward=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())  # DTensor numel: the global size
    root = os.path.join(out, mode)
    dist.barrier()

    before = _status_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    if mode == "gather":  # save_checkpoint before DCP: everything gathered to rank 0
        model_sd = training.gather_cpu_state_dict(model, rank == 0)
        optim_sd = training.get_full_optimizer_state_dict(model, optimizer, rank == 0)
        if rank == 0:
            os.makedirs(root, exist_ok=True)
            torch.save(model_sd, os.path.join(root, "model.pt"))
            torch.save(optim_sd, os.path.join(root, "optimizer.pt"))
        torch.save({"rng": torch.get_rng_state()}, os.path.join(out, f"rank_{rank}.pt"))
        del model_sd, optim_sd
        dist.barrier()
    else:
        ckpt = RecipeCheckpointer(root)
        ckpt.start_run()
        model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions())
        ckpt.save(1, {"step": 1}, {"rng": torch.get_rng_state()}, {"model": model_sd, "optimizer": optim_sd})
        del model_sd, optim_sd
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    written = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(root) for f in fs) if rank == 0 else 0
    row = {"mode": mode, "rank": rank, "params": n_params, "rss_before_mib": before / 1024,
           "peak_mib": peak / 1024, "save_peak_over_before_mib": (peak - before) / 1024, "save_s": seconds,
           "written_mib": written / 2**20}
    with open(os.path.join(out, f"result_{mode}_{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny shape (smoke run)")
    parser.add_argument("--worker", choices=("gather", "dcp"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = TINY if args.small else GPT2_SMALL
    if args.worker:
        worker(args.worker, shape, args.out)
        return
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for mode in ("gather", "dcp"):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   os.path.abspath(__file__), "--worker", mode, "--out", out] + (["--small"] if args.small else [])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{mode} failed:\n{proc.stderr[-4000:]}")
            for rank in (0, 1):
                with open(os.path.join(out, f"result_{mode}_{rank}.json")) as f:
                    rows.append(json.load(f))
    shape_name = "tiny" if args.small else "GPT-2-small"
    print(f"{shape_name} student ({rows[0]['params'] / 1e6:.1f} M parameters, fp32, AdamW), 2 processes, CPU/gloo")
    print("| mode | rank | RSS before save (MiB) | peak RSS during save (MiB) | peak - before (MiB) | save (s) | written (MiB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['rank']} | {r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['save_peak_over_before_mib']:.0f} | {r['save_s']:.1f} | "
              f"{r['written_mib']:.0f} |" if r["rank"] == 0 else
              f"| {r['mode']} | {r['rank']} | {r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} | "
              f"{r['save_peak_over_before_mib']:.0f} | {r['save_s']:.1f} | |")
    g0 = next(r for r in rows if r["mode"] == "gather" and r["rank"] == 0)
    d0 = next(r for r in rows if r["mode"] == "dcp" and r["rank"] == 0)
    print(f"rank 0, peak over the RSS before the save: dcp {d0['save_peak_over_before_mib']:.0f} MiB vs gather "
          f"{g0['save_peak_over_before_mib']:.0f} MiB; peak RSS dcp/gather = {d0['peak_mib'] / g0['peak_mib']:.2f}")


if __name__ == "__main__":
    main()
