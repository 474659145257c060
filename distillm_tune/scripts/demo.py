"""The offline CPU demo: train a teacher, distil a student with KD and with DistiLLM, compare.

    python -m distillm_tune.scripts.demo --out demo_out

Everything is built here, offline (``make_tiny_assets``): small instruction tasks with checkable
answers (sort, reverse, count, add, upper-case, extract numbers), a byte-level BPE tokenizer and
random GPT-2 checkpoints (teacher 4 x 128, student 2 x 64). Then, each step a run of the
``kd_offpolicy`` recipe:

1. ``sft`` on the teacher: the teacher learns the tasks;
2. ``sft`` on the student: the "SFT student" baseline and the starting point of distillation
   (as in the paper, students start from an SFT checkpoint);
3. ``kd`` (forward KL, fixed data) and ``distillm`` (skew reverse KL, adaptive off-policy SGO)
   from the SFT student with the SFT teacher, the same number of steps each;
4. ROUGE-L of all four models on the test split: greedy, and the paper's protocol (sampling at
   temperature 1 with seeds 10, 20, 30, 40, 50; mean ± std over the seeds).

It prints a table of ROUGE-L and wall time and writes ``results.md``, ``results.json`` and
``curves.png`` (validation ROUGE-L and loss against wall-clock time per method) into ``--out``.
"""

import argparse
import json
import os
import time
from typing import Dict, List, Sequence

from omegaconf import OmegaConf

def run(name: str, out: str, overrides: List[str], config: str = "tiny_cpu") -> Dict:
    """One recipe run of shipped ``config`` in this process; returns its metrics rows and wall time."""
    from distillm_tune.cli import resolve_config
    from distillm_tune.recipes.kd_offpolicy import KDOffPolicyRecipe

    # shipped inside the package: runs from an installed wheel
    cfg = OmegaConf.merge(OmegaConf.load(resolve_config(config)), OmegaConf.from_dotlist(overrides))
    print(f"\n=== {name}: {' '.join(o for o in overrides if not o.startswith(('assets_dir', 'output_dir')))}", flush=True)
    t0 = time.perf_counter()
    recipe = KDOffPolicyRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    wall = time.perf_counter() - t0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {"rows": rows, "wall_s": wall, "hf_model": os.path.join(out, "hf_model")}


def greedy_rouge(model_dir: str, data: str, max_prompt_len: int, max_new_tokens: int, limit: int,
                 template: str = "paper") -> float:
    """ROUGE-L (spec §5 scoring) of greedy generations on a dolly-format file; ``template`` as the
    dataset's (``paper`` or ``chat``: the checkpoint's chat template, stopping at any of its stop ids)."""
    import torch

    from distillm_tune.data import instruction_dataset
    from distillm_tune.eval.metrics import rouge_l
    from distillm_tune.models import load_hf, load_hf_tokenizer
    from distillm_tune.models.tokenizer import cut_at_stop, stop_ids
    from distillm_tune.sgo import generate_responses

    tok = load_hf_tokenizer(model_dir)
    ds = instruction_dataset(tok, data, split="all", max_prompt_len=max_prompt_len,
                             max_seq_len=max_prompt_len + max_new_tokens, template=template)
    model = load_hf(model_dir).eval()
    stops = stop_ids(tok)
    n = min(limit, len(ds))
    preds = []
    for i in range(0, n, 32):
        batch = [ds[j]["prompt"] for j in range(i, min(n, i + 32))]
        with torch.no_grad():
            out = generate_responses(model, batch, max_new_tokens=max_new_tokens, eos_ids=stops,
                                     pad_id=tok.pad_id, temperature=0.0)
        preds += [tok.decode(cut_at_stop(o["response"], stops)).strip() for o in out]
    return rouge_l(preds, [list(ds.examples[j].references) for j in range(n)])


def sampled_rouge(model_dir: str, data: str, out_dir: str, seeds: Sequence[int], limit: int,
                  max_prompt_len: int, max_new_tokens: int, template: str = "paper") -> Dict:
    """The paper's protocol (spec §5) with the evaluate recipe: sample at temperature 1 once per
    seed, ROUGE-L mean ± std over the seeds."""
    from distillm_tune.recipes.evaluate import EvaluateRecipe

    cfg = OmegaConf.create({
        "model_dir": model_dir, "tokenizer_dir": None, "output_dir": out_dir,
        "datasets": [{"name": "test", "path": data, "kind": "instruction"}],
        "seeds": [int(s) for s in seeds], "temperature": 1.0, "top_p": 1.0,
        "max_seq_len": max_prompt_len + max_new_tokens, "max_prompt_len": max_prompt_len,
        "greedy_max_new_tokens": max_new_tokens, "batch_size": 32, "dtype": "fp32", "device": "cpu",
        "max_examples": int(limit), "template": template,
    })
    recipe = EvaluateRecipe(cfg)
    recipe.setup()
    summary = recipe.evaluate()
    recipe.cleanup()
    m = summary["datasets"]["test"]["metrics"]["rougeL"]
    return {"mean": m["mean"], "std": m["std"], "per_seed": m["per_seed"]}


def score_model(model_dir: str, data: str, eval_dir: str, eval_seeds: Sequence[int], limit: int,
                max_prompt_len: int = 64, max_new_tokens: int = 32, template: str = "paper") -> Dict:
    """``{"greedy": ROUGE-L, "sampled": {mean, std, per_seed}}`` (sampled only with ``eval_seeds``)."""
    out = {"greedy": greedy_rouge(model_dir, data, max_prompt_len, max_new_tokens, limit, template)}
    if eval_seeds:
        out["sampled"] = sampled_rouge(model_dir, data, eval_dir, eval_seeds, limit, max_prompt_len, max_new_tokens,
                                       template)
    return out


def plot(curves: Dict[str, List[Dict]], path: str) -> bool:
    """Write the curves; False (and a hint) when matplotlib, the ``plots`` extra, is missing."""
    try:
        import matplotlib
    except ImportError:
        print(f"skipped {os.path.basename(path)}: matplotlib is not installed (pip install 'distillm-tune[plots]')")
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in curves.items():
        val = [r for r in rows if "val_loss" in r]
        axes[0].plot([r["train_time"] for r in val], [r.get("val_rouge_l", float("nan")) for r in val], marker="o", label=name)
        axes[1].plot([r["train_time"] for r in val], [r["val_loss"] for r in val], marker="o", label=name)
    axes[0].set(xlabel="training wall-clock (s)", ylabel="validation ROUGE-L (greedy)", title="ROUGE-L")
    axes[1].set(xlabel="training wall-clock (s)", ylabel="validation CE of the student", title="validation loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--student-epochs", type=int, default=4)
    ap.add_argument("--distil-epochs", type=int, default=4)
    ap.add_argument("--steps-per-epoch", type=int, default=250)
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--eval-seeds", default="10 20 30 40 50",
                    help="sampling seeds of the sampled test ROUGE-L (the paper's); '' = greedy only")
    # At this scale the validation loss keeps falling, so from the paper's GPT-2 setting (phi0 = 0)
    # phi would never rise and DistiLLM would equal KD; 0.2 is the paper's OpenLLaMA setting.
    ap.add_argument("--phi0", type=float, default=0.2, help="initial SGO probability of distillm")
    args = ap.parse_args(argv)

    from distillm_tune.scripts.make_tiny_assets import make_tiny_assets

    out = os.path.abspath(args.out)
    t_start = time.perf_counter()
    assets = os.path.join(out, "assets")
    make_tiny_assets(assets)
    # overwrite=true: running the demo again into the same --out redoes every run from scratch
    common = [f"assets_dir={assets}", f"seed={args.seed}", f"max_steps_per_epoch={args.steps_per_epoch}",
              "validation.every_n_steps=125", "validation.rouge_examples=48", "validation.max_examples=96",
              "overwrite=true"]
    runs = {}
    runs["teacher (SFT)"] = run("teacher SFT", os.path.join(out, "teacher_sft"), common + [
        "method=sft", f"student.checkpoint_dir={assets}/teacher", f"output_dir={out}/teacher_sft",
        f"epochs={args.teacher_epochs}", "optimizer.lr=1e-3"])
    teacher = runs["teacher (SFT)"]["hf_model"]
    runs["student (SFT)"] = run("student SFT", os.path.join(out, "student_sft"), common + [
        "method=sft", f"output_dir={out}/student_sft", f"epochs={args.student_epochs}", "optimizer.lr=1e-3"])
    student = runs["student (SFT)"]["hf_model"]
    for method, extra in (("kd", []), ("distillm", [f"sgo.scheduler.phi0={args.phi0}"])):
        runs[f"student ({method})"] = run(method, os.path.join(out, method), common + extra + [
            f"method={method}", f"student.checkpoint_dir={student}", f"teacher.checkpoint_dir={teacher}",
            f"output_dir={out}/{method}", f"epochs={args.distil_epochs}", "optimizer.lr=5e-4"])

    eval_seeds = [int(x) for x in args.eval_seeds.replace(",", " ").split()]
    print("\n=== evaluating on the test split (ROUGE-L: greedy"
          + (f"; sampled, seeds {eval_seeds})" if eval_seeds else ")"), flush=True)
    test = os.path.join(assets, "data", "test.jsonl")
    results = {}
    for name, r in runs.items():
        score = score_model(r["hf_model"], test, os.path.join(os.path.dirname(r["hf_model"]), "eval"),
                            eval_seeds, args.eval_examples)
        results[name] = {"rouge_l": round(score["greedy"], 2)}
        if "sampled" in score:
            results[name]["rouge_l_sampled"] = {"mean": round(score["sampled"]["mean"], 2),
                                                "std": round(score["sampled"]["std"], 2)}
        results[name].update(train_wall_s=round(r["wall_s"], 1), steps=r["rows"][-1]["step"])
    sampled_head = f" | test ROUGE-L, sampled ({len(eval_seeds)} seeds)" if eval_seeds else ""
    lines = [f"| model | test ROUGE-L, greedy{sampled_head} | training wall time (s) | steps |",
             "|---|---:|" + ("---:|" if eval_seeds else "") + "---:|---:|"]
    for k, v in results.items():
        smp = v.get("rouge_l_sampled")
        cell = f" | {smp['mean']:.2f} ± {smp['std']:.2f}" if smp else ""
        lines.append(f"| {k} | {v['rouge_l']:.2f}{cell} | {v['train_wall_s']:.1f} | {v['steps']} |")
    table = "\n".join(lines)
    print("\n" + table)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    plotted = plot({k: v["rows"] for k, v in runs.items() if k.startswith("student (") and "SFT" not in k}
                   | {"student (SFT)": runs["student (SFT)"]["rows"]}, os.path.join(out, "curves.png"))
    written = "results.md, results.json" + (", curves.png" if plotted else "")
    print(f"\nwrote {written} to {out} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
