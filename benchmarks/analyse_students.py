"""What distillation did to the students' next-token distributions, teacher-forced on references.

    python benchmarks/analyse_students.py runs/reproduce_smollm2 [--limit 64] [--runs fkl distillm ...]

For a reproduction folder (``recipes/reproduce_cpu.sh``; its ``prepare.json`` names the pair, the
teacher and the SFT student), every final student ``runs/<run>/seed_<s>/hf_model``, the SFT student
they all start from and the teacher read the first ``--limit`` validation rows (the pair's template
and lengths) with the reference response as input. Per response token: the entropy of the model's
next-token distribution (nats), the probability it gives the reference token, and whether its
arg-max is the reference token (what greedy decoding follows when its earlier tokens were right).
Mean over tokens; mean ± std over the training seeds. The baseline is KD (``fkl``): a column
``x KD`` would hide the direction, so the table prints the values side by side.

Why: on the SmolLM2 pair DistiLLM (skew reverse KL on the student's own outputs) scores above KD
when the test answers are sampled and below it when they are greedy; the reverse KL is
mode-seeking, which this measures directly (``docs/reproduction_smollm2.md``).
"""

import argparse
import glob
import json
import os
import sys
from typing import Dict, List

import torch

from distillm_tune.data import instruction_dataset
from distillm_tune.data.collate import collate_prompt_response
from distillm_tune.eval.metrics import mean_std
from distillm_tune.models import load_hf, load_hf_tokenizer
from distillm_tune.scripts.reproduce import PAIRS


@torch.no_grad()
def token_stats(model_dir: str, data: str, pair, limit: int, batch_size: int = 16) -> Dict[str, float]:
    tok = load_hf_tokenizer(model_dir)
    ds = instruction_dataset(tok, data, split="all", max_prompt_len=pair.max_prompt_len,
                             max_seq_len=pair.max_prompt_len + pair.max_new_tokens, template=pair.template)
    model = load_hf(model_dir).eval()
    n = min(limit, len(ds))
    entropy = prob = top1 = 0.0
    count = 0
    for i in range(0, n, batch_size):
        batch = collate_prompt_response([ds[j] for j in range(i, min(n, i + batch_size))], tok.pad_id)
        logits = model(batch["tokens"])
        logits = torch.cat(logits, 1) if isinstance(logits, list) else logits
        keep = batch["labels"] != -100
        logp = torch.log_softmax(logits[keep].float(), -1)
        ref = batch["labels"][keep]
        entropy += float(-(logp.exp() * logp).sum(-1).sum())
        prob += float(logp.gather(1, ref[:, None]).exp().sum())
        top1 += float((logp.argmax(-1) == ref).sum())
        count += int(keep.sum())
    return {"entropy": entropy / count, "p_ref": prob / count, "top1": top1 / count, "tokens": count}


def main(argv: List[str] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="a reproduction folder (with prepare.json and runs/)")
    ap.add_argument("--limit", type=int, default=64, help="validation rows")
    ap.add_argument("--runs", nargs="*", default=None, help="runs to read (default: every finished run)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open(os.path.join(args.out, "prepare.json")) as f:
        info = json.load(f)
    pair = PAIRS[info["settings"].get("pair", "tiny")]
    data = os.path.join(info["assets"], "data", "valid.jsonl")
    rows = [("teacher", [info["teacher"]]), ("SFT student (start)", [info["student"]])]
    names = args.runs or sorted(os.listdir(os.path.join(args.out, "runs")))
    for name in names:
        dirs = sorted(glob.glob(os.path.join(args.out, "runs", name, "seed_*", "hf_model")))
        if dirs:
            rows.append((f"`{name}`", dirs))
    print(f"{args.out}: first {args.limit} validation rows, teacher-forced on the reference responses\n")
    print("| model | seeds | entropy (nats) | p(reference token) | arg-max = reference |")
    print("|---|---:|---:|---:|---:|")
    for label, dirs in rows:
        stats = [token_stats(d, data, pair, args.limit) for d in dirs]
        cols = [mean_std([s[k] for s in stats]) for k in ("entropy", "p_ref", "top1")]
        print(f"| {label} | {len(dirs)} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in cols) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
