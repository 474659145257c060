"""A quantized teacher on a real checkpoint: SmolLM2-135M-Instruct teaching a 6-layer student cut
from it (``configs/smollm2_135m_to_6layer_cpu.yaml``, ``method=kd``), with
``teacher.quantization`` null (the baseline), ``int8_weight_only`` and ``nf4``.

    python benchmarks/bench_teacher_quantization.py [--steps 8]

Per scheme: the teacher's weight bytes (parameters and buffers; torchao's quantized tensors by
their inner tensors) and their ratio to the baseline's, and the per-step loss of the same run
(same data, same student, same seed) relative to the baseline's: max and final |Δ| / loss.
"""

import argparse
import json
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--smollm2-dir", default=os.path.expanduser("~/.cache/distillm_tune/smollm2-135m-instruct"))
    args = ap.parse_args()

    import torch
    from omegaconf import OmegaConf

    from distillm_tune.cli import resolve_config
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe
    from distillm_tune.scripts.get_smollm2 import get_smollm2
    from distillm_tune.scripts.make_student import make_student
    from distillm_tune.scripts.make_tiny_assets import make_tiny_assets
    from distillm_tune.training.quantization import model_bytes

    work = tempfile.mkdtemp(prefix="bench_teacher_q_")
    teacher = get_smollm2(args.smollm2_dir)
    ckpt = os.path.join(work, "checkpoints")
    os.makedirs(ckpt)
    os.symlink(teacher, os.path.join(ckpt, "smollm2-135m-instruct"))
    make_student(teacher, [0, 6, 12, 18, 24, 29], os.path.join(ckpt, "smollm2-6layer"))
    assets = os.path.join(work, "assets")
    make_tiny_assets(assets)
    common = [f"checkpoints_dir={ckpt}", f"data_dir={assets}/data", "method=kd", "epochs=1",
              f"max_steps_per_epoch={args.steps}", f"batch_size={args.batch_size}", "validation.max_examples=16",
              "overwrite=true"]
    config = OmegaConf.load(resolve_config("smollm2_135m_to_6layer_cpu"))
    results = {}
    for scheme in ("null", "int8_weight_only", "nf4"):
        out = os.path.join(work, scheme)
        cfg = OmegaConf.merge(config, OmegaConf.from_dotlist(common + [f"output_dir={out}",
                                                                       f"teacher.quantization={scheme}"]))
        recipe = KDOffPolicyRecipe(cfg)
        recipe.setup()
        teacher_bytes = model_bytes(recipe.teacher)
        recipe.train()
        recipe.cleanup()
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        results[scheme] = {"bytes": teacher_bytes, "loss": [r["loss"] for r in rows if r["step"] > 0]}
    base = results["null"]
    print(f"\nSmolLM2-135M-Instruct teacher -> 6-layer student, kd, {args.steps} steps, batch {args.batch_size}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| teacher | weights MiB | x fp32 | max rel. loss deviation | final rel. loss deviation | final loss |")
    print("|---|---:|---:|---:|---:|---:|")
    for scheme, r in results.items():
        dev = [abs(a - b) / abs(b) for a, b in zip(r["loss"], base["loss"])]
        print(f"| {'fp32' if scheme == 'null' else scheme} | {r['bytes'] / 2**20:.1f} | {r['bytes'] / base['bytes']:.3f} | "
              f"{max(dev):.2e} | {dev[-1]:.2e} | {r['loss'][-1]:.4f} |")


if __name__ == "__main__":
    main()
