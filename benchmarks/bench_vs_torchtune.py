"""Head to head: torchtune's ``knowledge_distillation_single_device`` against our ``kd_offpolicy``
``method=kd`` (logits path, and fused with ``fused_loss_chunk_size``), same models, same batches.

    python benchmarks/bench_vs_torchtune.py                          # tiny and GPT-2-small Llama shapes
    python benchmarks/bench_vs_torchtune.py --shapes tiny --steps 2  # seconds (smoke run, tested)
    python benchmarks/bench_vs_torchtune.py --kd-ratio 1.0           # both recipes at kd_ratio 1

Runs (each in its own subprocess, so memory is per run): ``torchtune`` (the baseline: its stock
recipe, LoRA student, ``ForwardKLWithChunkedOutputLoss`` + ``CEWithChunkedOutputLoss``), ``ours
logits`` (``method=kd``, the divergence over both models' chunked logits) and ``ours fused``
(``fused_loss_chunk_size``: the divergence from hidden states and output weights, chunk by chunk).
All three run at ``--kd-ratio`` (the fused loss takes the CE term in its chunked pass).

Equality of the workload:

- models: one Hugging Face Llama checkpoint per model (``transformers.LlamaConfig`` +
  ``save_pretrained``, random weights, seeds fixed), read by torchtune's ``FullModelHFCheckpointer``
  (``model_type: LLAMA2``) into its ``llama2`` / ``lora_llama2`` builders and by our ``load_hf``
  (torchtune's ``llama3`` builder: the same modules; RoPE base 10000, RMSNorm eps 1e-5, untied
  head, the same ``intermediate_dim``); same LoRA (q_proj, v_proj, rank 8, alpha 16, no dropout,
  not on the MLP or the head); fp32; the teacher frozen in eval mode;
- tokens: one SentencePiece ``tokenizer.model`` in both checkpoint directories (torchtune's
  ``llama2_tokenizer`` and our ``load_hf_tokenizer`` read it: bos 1, eos 2, pad 0), but the
  batches do not go through it: both recipes' ``dataset._component_`` is a function of this file
  reading one file of token ids. Every row is the same ``[BOS] + prompt + response + [EOS]`` of
  exactly ``--seq-len`` tokens (random ids, the second half is the response), so no batch has
  padding, any row order gives the same batches, and the step-1 cross-entropies of the
  recipes must agree (same weights, LoRA's B = 0 at the start: the ``CE step 1`` column checks
  it; torchtune's logged ``kd_loss`` is not comparable: its "forward KL" is the cross-entropy
  -sum p log q, which is KL plus the teacher's entropy, same gradient);
  labels: the prompt masked, the response trained, shifted by one in both;
- loss: forward KL (torchtune's ``ForwardKLWithChunkedOutputLoss``, our ``method=kd``'s FKL) plus
  CE, ``(1 - kd_ratio) * CE + kd_ratio * KL``, both over ``--num-output-chunks`` (torchtune's
  default 8; its recipe asserts that both losses use the model's chunk count);
- loop: batch ``--batch-size``, ``--steps`` optimizer steps, no gradient accumulation, no
  gradient clipping, AdamW (same lr), 1 process, ``--threads`` intra-op threads; no checkpoint is
  saved at the end (``save_checkpoint``/``export`` are no-ops here: both recipes would write the
  merged model) and ours runs no validation.

Measured: tokens/s = batch x seq_len tokens per step over the mean wall time between consecutive
step logs (both recipes log every step through the same logger class of this file), leaving out
the first ``--warmup`` steps; ``peak MiB`` = the run's peak resident memory (loading included:
``ru_maxrss`` after setup, or the training peak if larger); ``train MiB`` = the peak resident memory of the training steps (``VmHWM`` after a reset
through ``/proc/self/clear_refs`` once setup is done: weights, optimizer state, activations, loss);
``step MiB`` = that peak less the resident memory when training starts (what the steps add on
top of the loaded models: activations, logits, loss, gradients, AdamW state).
"""

import argparse
import importlib.util
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)

IGNORE = -100
# (layers, embed_dim, heads, kv_heads, intermediate_dim)
SHAPES = {
    "tiny": {"vocab": 32000, "student": (2, 64, 4, 2, 172), "teacher": (4, 128, 4, 2, 344)},
    # GPT-2-small-like student, GPT-2-medium-like teacher, Llama 2's vocabulary size
    "gpt2": {"vocab": 32000, "student": (12, 768, 12, 12, 2048), "teacher": (24, 1024, 16, 16, 2816)},
}
LORA = {"lora_attn_modules": ["q_proj", "v_proj"], "apply_lora_to_mlp": False, "apply_lora_to_output": False,
        "lora_rank": 8, "lora_alpha": 16}
LR = 1e-4


# --------------------------------------------------------------------------- shared components


_LOG_TIMES = []


class StepTimeLogger:
    """The metric logger of both recipes here: the time of every ``log_dict`` call and its row."""

    rows = []

    def __init__(self, **kwargs):
        pass

    def log_config(self, cfg):
        pass

    def log(self, name, data, step):
        pass

    def log_dict(self, payload, step):
        _LOG_TIMES.append(time.perf_counter())
        StepTimeLogger.rows.append({k: float(v) for k, v in payload.items() if not isinstance(v, str)})

    def close(self):
        pass


def _read_rows(source):
    with open(source) as f:
        return json.load(f)


def torchtune_dataset(tokenizer, source, **kwargs):
    """torchtune's SFT format: ``tokens`` and unshifted ``labels`` (prompt masked)."""
    return [{"tokens": r["prompt"] + r["response"], "labels": [IGNORE] * len(r["prompt"]) + r["response"]}
            for r in _read_rows(source)]


class _Ids:
    """Our recipe's dataset interface: ``{"prompt", "response"}`` samples and ``stats``."""

    def __init__(self, source):
        from distillm_tune.data._rows import DataStats

        self.samples = _read_rows(source)
        self.stats = DataStats(rows_read=len(self.samples), kept=len(self.samples))

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def our_dataset(tokenizer, source, **kwargs):
    return _Ids(source)


# ------------------------------------------------------------------------------------- assets


def write_assets(root: str, shape: str, rows: int, seq_len: int, seed: int = 0) -> None:
    """student/ and teacher/ HF Llama checkpoints sharing one SentencePiece tokenizer.model; rows.json."""
    import io

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = SHAPES[shape]
    words = "door pig cherry dog black green lamp owl blue bat sun lime red cat tree fox".split()
    rng = random.Random(seed)
    text = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=model, vocab_size=60,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    for seed_off, name in enumerate(("student", "teacher")):
        layers, dim, heads, kv, inter = spec[name]
        cfg = LlamaConfig(vocab_size=spec["vocab"], hidden_size=dim, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=seq_len,
                          rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                          eos_token_id=2, pad_token_id=None, attention_bias=False, mlp_bias=False)
        torch.manual_seed(seed + seed_off)
        out = os.path.join(root, name)
        LlamaForCausalLM(cfg).save_pretrained(out)
        with open(os.path.join(out, "tokenizer.model"), "wb") as f:
            f.write(model.getvalue())
    half = seq_len // 2
    g = random.Random(seed + 7)
    row = {"prompt": [1] + [g.randrange(3, spec["vocab"]) for _ in range(half - 1)],
           "response": [g.randrange(3, spec["vocab"]) for _ in range(seq_len - half - 1)] + [2]}
    with open(os.path.join(root, "rows.json"), "w") as f:
        json.dump([row] * rows, f)


def _hf_dims(spec, name, seq_len):
    layers, dim, heads, kv, inter = spec[name]
    return {"vocab_size": spec["vocab"], "num_layers": layers, "embed_dim": dim, "num_heads": heads,
            "num_kv_heads": kv, "intermediate_dim": inter, "max_seq_len": seq_len, "norm_eps": 1e-5}


# ----------------------------------------------------------------------------------- children


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def torchtune_config(args):
    from omegaconf import OmegaConf

    spec = SHAPES[args.shape]
    out = os.path.join(args.work, "out_" + args.run)

    def ckpt(name):
        return {"_component_": "torchtune.training.FullModelHFCheckpointer",
                "checkpoint_dir": os.path.join(args.assets, name), "checkpoint_files": ["model.safetensors"],
                "recipe_checkpoint": None, "output_dir": out, "model_type": "LLAMA2"}

    return OmegaConf.create({
        "output_dir": out,
        "model": {"_component_": "torchtune.models.llama2.lora_llama2", **LORA, **_hf_dims(spec, "student", args.seq_len)},
        "teacher_model": {"_component_": "torchtune.models.llama2.llama2", **_hf_dims(spec, "teacher", args.seq_len)},
        "tokenizer": {"_component_": "torchtune.models.llama2.llama2_tokenizer",
                      "path": os.path.join(args.assets, "student", "tokenizer.model"),
                      "max_seq_len": args.seq_len, "prompt_template": None},
        "checkpointer": ckpt("student"), "teacher_checkpointer": ckpt("teacher"),
        "resume_from_checkpoint": False, "save_adapter_weights_only": False,
        "dataset": {"_component_": "bench_vs_torchtune.torchtune_dataset", "source": os.path.join(args.assets, "rows.json")},
        "seed": 0, "shuffle": False, "batch_size": args.batch_size,
        "optimizer": {"_component_": "torch.optim.AdamW", "lr": LR},
        "lr_scheduler": {"_component_": "torchtune.training.lr_schedulers.get_cosine_schedule_with_warmup",
                         "num_warmup_steps": 0},
        "loss": {"_component_": "torchtune.modules.loss.CEWithChunkedOutputLoss",
                 "num_output_chunks": args.num_output_chunks},
        "kd_loss": {"_component_": "torchtune.modules.loss.ForwardKLWithChunkedOutputLoss",
                    "num_output_chunks": args.num_output_chunks},
        "kd_ratio": args.kd_ratio,
        "epochs": 1, "max_steps_per_epoch": args.steps, "gradient_accumulation_steps": 1, "clip_grad_norm": None,
        "compile": False, "enable_activation_checkpointing": False, "enable_activation_offloading": False,
        "metric_logger": {"_component_": "bench_vs_torchtune.StepTimeLogger"},
        "log_every_n_steps": 1, "log_peak_memory_stats": False, "device": "cpu", "dtype": "fp32",
    })


def _run_torchtune(args):
    import torchtune

    path = os.path.join(os.path.dirname(os.path.dirname(torchtune.__file__)), "recipes",
                        "knowledge_distillation_single_device.py")
    spec = importlib.util.spec_from_file_location("tt_kd_single_device", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = torchtune_config(args)
    recipe = mod.KDRecipeSingleDevice(cfg=cfg)
    recipe.setup(cfg=cfg)
    recipe.save_checkpoint = lambda epoch: None
    return recipe, lambda r: r["class_loss"]


def our_config(args):
    from omegaconf import OmegaConf

    rows = os.path.join(args.assets, "rows.json")
    half = args.seq_len // 2
    data = {"_component_": "bench_vs_torchtune.our_dataset", "source": rows, "split": "all",
            "max_prompt_len": half, "max_seq_len": args.seq_len}
    over = {
        "assets_dir": args.assets, "output_dir": os.path.join(args.work, "out_" + args.run), "method": "kd",
        "kd_ratio": args.kd_ratio, "epochs": 1, "max_steps_per_epoch": args.steps, "batch_size": args.batch_size,
        "gradient_accumulation_steps": 1, "num_output_chunks": args.num_output_chunks, "clip_grad_norm": None,
        "fused_loss_chunk_size": args.chunk if args.run.startswith("fused") else None,
        "max_seq_len": args.seq_len, "max_prompt_len": half, "seed": 0, "dtype": "fp32",
        "student": {"lora": dict(LORA)}, "optimizer": {"lr": LR, "weight_decay": 0.01},
        "dataset": data, "validation": {"dataset": data, "every_n_steps": 10**9, "max_examples": args.batch_size,
                                        "batch_size": args.batch_size},
        "metric_logger": {"_component_": "bench_vs_torchtune.StepTimeLogger"}, "log_every_n_steps": 1,
    }
    base = OmegaConf.load(os.path.join(REPO, "configs", "tiny_cpu.yaml"))
    base.metric_logger = {}
    return OmegaConf.merge(base, OmegaConf.create(over))


def _run_ours(args):
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    recipe = KDOffPolicyRecipe(our_config(args))
    recipe.setup()
    recipe.save_checkpoint = lambda: None
    recipe.export = lambda *a, **k: None
    return recipe, lambda r: r["loss_ce"]


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, HERE)
    import bench_vs_torchtune as me  # the module the configs' _component_s name (not __main__)

    recipe, loss_of = (_run_torchtune if args.run.startswith("torchtune") else _run_ours)(args)
    setup_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _reset_hwm()
    at_start = _status_mib("VmRSS")
    recipe.train()
    train_peak = _status_mib("VmHWM")
    recipe.cleanup()
    times, rows = me._LOG_TIMES, me.StepTimeLogger.rows
    if len(times) != args.steps:
        raise RuntimeError(f"expected {args.steps} step logs, got {len(times)}")
    gaps = [b - a for a, b in zip(times, times[1:])][max(args.warmup - 1, 0):]
    print("RESULT " + json.dumps({
        # the reset of VmHWM also resets the kernel's ru_maxrss: the run's peak is the larger of the two phases'
        "peak_mib": max(setup_peak, train_peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "setup_mib": setup_peak,
        "train_mib": train_peak, "step_mib": train_peak - at_start, "step_s": statistics.mean(gaps), "ce1": loss_of(rows[0]),
    }), flush=True)


# ------------------------------------------------------------------------------------- parent


def run_child(args, shape, run, kd_ratio, assets, work):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--run", run, "--shape", shape, "--assets", assets,
           "--work", work, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--kd-ratio", str(kd_ratio),
           "--chunk", str(args.chunk), "--num-output-chunks", str(args.num_output_chunks),
           "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([REPO, HERE, env.get("PYTHONPATH", "")])
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work)
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not line:
        return None, p.stderr[-3000:]
    return json.loads(line[0][len("RESULT "):]), None


def bench_shape(args, shape, work) -> list:
    assets = os.path.join(work, shape)
    write_assets(assets, shape, rows=args.batch_size * args.steps, seq_len=args.seq_len)
    plan = [("torchtune", args.kd_ratio, "torchtune"), ("ours logits", args.kd_ratio, "torchtune"),
            ("ours fused", args.kd_ratio, "torchtune")]
    results, table = {}, []
    for name, kd, base in plan:
        run = name.split()[-1] if name != "torchtune" else "torchtune"
        res, err = run_child(args, shape, run, kd, assets, work)
        if res is None:
            sys.exit(f"{shape} {name} run failed:\n{err}")
        results[name] = res
        table.append((name, res, base))
    out = []
    for name, r, base in table:
        b = results[base]
        tps, btps = args.batch_size * args.seq_len / r["step_s"], args.batch_size * args.seq_len / b["step_s"]
        out.append({"shape": shape, "run": name, "tokens_s": tps, "x_tps": tps / btps, "peak_mib": r["peak_mib"],
                    "x_peak": r["peak_mib"] / b["peak_mib"], "train_mib": r["train_mib"],
                    "x_train": r["train_mib"] / b["train_mib"],
                    "step_mib": r["step_mib"], "x_step": r["step_mib"] / b["step_mib"], "step_s": r["step_s"], "ce1": r["ce1"]})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,gpt2", help="comma-separated: " + ", ".join(SHAPES))
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the mean step time")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per row (every row exactly this long)")
    ap.add_argument("--kd-ratio", type=float, default=0.5, help="torchtune's default 0.5")
    ap.add_argument("--chunk", type=int, default=256, help="fused_loss_chunk_size of the fused row")
    ap.add_argument("--num-output-chunks", type=int, default=8, help="torchtune's default 8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the rows here")
    for hidden in ("--run", "--shape", "--assets", "--work"):
        ap.add_argument(hidden, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)
    if args.steps < args.warmup + 1 or args.steps < 2:
        ap.error("--steps must exceed --warmup (and be at least 2): the mean needs one timed step")
    work = tempfile.mkdtemp(prefix="bench_vs_torchtune_")  # checkpoints (GB at the gpt2 shape): removed at the end
    try:
        rows = _bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def _bench(args, work):
    print(f"batch {args.batch_size} x {args.seq_len} tokens (no padding), {args.steps} steps ({args.warmup} warm-up), "
          f"kd_ratio {args.kd_ratio}, FKL + CE over {args.num_output_chunks} chunks, fused chunk {args.chunk}, LoRA "
          f"q/v r{LORA['lora_rank']} a{LORA['lora_alpha']}, fp32, {args.threads} threads", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        spec = SHAPES[shape]
        print(f"{shape}: student {spec['student'][0]}x{spec['student'][1]}, teacher {spec['teacher'][0]}x"
              f"{spec['teacher'][1]}, vocab {spec['vocab']}", flush=True)
        rows += bench_shape(args, shape, work)
    print("\n| shape | run | tokens/s | x torchtune | peak MiB | x torchtune | train MiB | x torchtune | step MiB | x torchtune "
          "| CE step 1 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['shape']} | {r['run']} | {r['tokens_s']:.0f} | {r['x_tps']:.2f} | {r['peak_mib']:.0f} | "
              f"{r['x_peak']:.2f} | {r['train_mib']:.0f} | {r['x_train']:.2f} | {r['step_mib']:.0f} | "
              f"{r['x_step']:.2f} | {r['ce1']:.5f} |")
    return rows


if __name__ == "__main__":
    main()
