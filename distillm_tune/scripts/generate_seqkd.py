"""Teacher outputs for sequence-level KD (``method=seqkd``, DISTILLM_SPEC §4), generated once.

    python -m distillm_tune.scripts.generate_seqkd --model-dir TEACHER --data train.jsonl \\
        --out seqkd.jsonl [--batch-size 16 --max-prompt-len 256 --max-seq-len 512 \\
        --temperature 1.0 --top-p 1.0 --seed 1 --split all --dtype fp32 --device cpu]

SeqKD trains the student with plain CE on the teacher's responses. Generating them inside the
training loop would repeat the most expensive step every epoch, so they are sampled once here with
the batched KV-cached sampler (``sgo.sampler.generate_responses``) and written as dolly-format rows
(``instruction``, ``context``, ``response`` = the teacher's text, ``category``): the KD recipe reads
the file with its normal instruction dataset, no special code path.

Rules, matching the training data's (``data.instruction``):

* the prompt is the paper's template, encoded with BOS; a prompt longer than ``--max-prompt-len``
  is skipped (the training dataset drops it too), and counted;
* at most ``--max-seq-len - --max-prompt-len`` new tokens, so prompt + response fits the budget;
* a response is decoded up to the teacher's first EOS and stripped; an empty one is skipped (a
  dolly row needs a non-empty response), a response that hit the length limit without EOS is kept
  and counted; a text whose encoding by the training data (with its EOS) would not fit
  ``--max-seq-len`` is cut until it does (``cut_to_fit``), so a recipe run with the same lengths
  drops no row as too long;
* prompts are batched in file order and one ``torch.Generator`` seeded with ``--seed`` is used for
  the whole run, so the same arguments give the same file.

``--split`` picks ``train`` / ``valid`` / ``test`` of a full dolly file with the same
``split_rows`` as training (``--valid-size``, ``--test-size``, ``--split-seed``); the default
``all`` takes every row (use it when ``--data`` already is the training split, then read the output
with ``split=all``). The output is written to a temporary file and renamed into place.
"""

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Dict, List, Optional

import torch
from torchtune import training, utils
from tqdm import tqdm

from distillm_tune.data._rows import DataStats
from distillm_tune.data.instruction import (SPLITS, TEMPLATES, encode_prompt, encode_response, load_dolly_rows,
                                           split_rows)
from distillm_tune.models.hf import load_hf, load_hf_tokenizer
from distillm_tune.models.tokenizer import cut_at_stop, stop_ids
from distillm_tune.sgo.sampler import generate_responses

log = logging.getLogger("distillm_tune.generate_seqkd")


def generate_seqkd(model_dir: str, data: str, out: str, batch_size: int = 16,
                   max_prompt_len: int = 256, max_seq_len: int = 512, temperature: float = 1.0,
                   top_p: float = 1.0, seed: int = 1, split: str = "all", valid_size: int = 500,
                   test_size: int = 500, split_seed: int = 1, dtype: str = "fp32",
                   device: Optional[str] = None, template: str = "paper") -> DataStats:
    """Write ``out`` (rules: module docstring); returns the counts (``kept``, ``skipped_*``)."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model-dir {model_dir!r} does not exist")
    if not os.path.isfile(data):
        raise FileNotFoundError(f"--data {data!r} does not exist")
    if not 1 <= max_prompt_len < max_seq_len:
        raise ValueError(f"need 1 <= --max-prompt-len < --max-seq-len, got --max-prompt-len {max_prompt_len}, "
                         f"--max-seq-len {max_seq_len}")
    if not temperature >= 0:
        raise ValueError(f"--temperature must be >= 0 (0: greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1], got {top_p}")
    if os.path.isdir(out):
        raise ValueError(f"--out {out!r} is a folder; expected the path of the .jsonl file to write")
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {SPLITS}, got {split!r}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if template not in TEMPLATES:
        raise ValueError(f"--template must be one of {TEMPLATES}, got {template!r}")

    examples, stats = load_dolly_rows(data)
    if split != "all":
        examples = dict(zip(("train", "valid", "test"),
                            split_rows(examples, valid_size, test_size, split_seed)))[split]
    torch_device = utils.get_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:  # refuses a teacher with NaN/inf weights, naming the tensor
        model = load_hf(model_dir, dtype=training.get_dtype(dtype, torch_device)).to(torch_device).eval()
    except ValueError as e:
        raise ValueError(f"--model-dir: {e}") from None
    tokenizer = load_hf_tokenizer(model_dir)
    limit = getattr(model, "max_seq_len", None)
    if limit is not None and max_seq_len > limit:
        raise ValueError(f"--max-seq-len {max_seq_len} exceeds the teacher's {limit} positions")

    kept = []
    for ex in examples:
        ids = encode_prompt(tokenizer, ex.instruction, ex.input, template)  # as the training data
        if len(ids) > max_prompt_len:
            stats.add("skipped_long_prompt")
        else:
            kept.append((ex, ids))
    generator = torch.Generator(device=torch_device).manual_seed(seed)
    stops = stop_ids(tokenizer)
    rows: List[Dict[str, str]] = []
    for start in tqdm(range(0, len(kept), batch_size), desc="seqkd", file=sys.stderr):
        batch = kept[start : start + batch_size]
        samples = generate_responses(
            # one token short of the budget: the training dataset appends EOS to a response
            # that ran to the limit, and it must still fit in max_seq_len
            model, [ids for _, ids in batch], max_new_tokens=max_seq_len - max_prompt_len - 1,
            eos_ids=stops, pad_id=tokenizer.pad_id, temperature=temperature, top_p=top_p,
            # one process, an unsharded model: never wait for other ranks (the training recipe
            # calls this on rank 0 alone for method=distillm2's teacher responses)
            generator=generator, sync_across_ranks=False)
        for (ex, prompt_ids), sample in zip(batch, samples):
            response = sample["response"]
            if any(t in stops for t in response):
                response = cut_at_stop(response, stops)
            else:
                stats.add("no_eos")
            text = _text_that_fits(tokenizer, ex, prompt_ids, response, max_seq_len, template, stats)
            if not text:
                stats.add("skipped_empty_response")
                continue
            rows.append({"instruction": ex.instruction, "context": ex.input, "response": text,
                         "category": ex.category})

    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(out + ".tmp", out)
    stats.kept = len(rows)
    log.info("seqkd %s -> %s: %s", data, out, stats.summary())
    return stats


def _text_that_fits(tokenizer, ex, prompt: List[int], response: List[int], max_seq_len: int, template: str,
                    stats: DataStats) -> str:
    """The response's text, cut so that the training data's own encoding of it (the text encoded
    again, its stop id appended: ``encode_response``) fits ``max_seq_len`` after the prompt, or the
    recipe would drop the row as too long. Decoding and encoding again need not give the sampled
    ids back (a byte token alone decodes to U+FFFD, which encodes to three), so it is measured."""
    cut = False
    while True:
        text = tokenizer.decode(response).strip()
        over = len(prompt) + len(encode_response(tokenizer, dataclasses.replace(ex, references=[text]), template)) \
            - max_seq_len
        if over <= 0 or not text:
            stats.add("cut_to_fit", int(cut))
            return text
        cut, response = True, response[: max(0, len(response) - over)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="teacher HF checkpoint directory")
    ap.add_argument("--data", required=True, help="dolly-format .jsonl/.json training data")
    ap.add_argument("--out", required=True, help="output .jsonl (dolly format)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-prompt-len", type=int, default=256)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--split", default="all", choices=SPLITS)
    ap.add_argument("--valid-size", type=int, default=500)
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--split-seed", type=int, default=1)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--template", default="paper", choices=TEMPLATES,
                    help="prompt rendering: the paper's template or the checkpoint's chat template")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stats = generate_seqkd(
        args.model_dir, args.data, args.out, args.batch_size, args.max_prompt_len,
        args.max_seq_len, args.temperature, args.top_p, args.seed, args.split, args.valid_size,
        args.test_size, args.split_seed, args.dtype, args.device, args.template)
    print(f"wrote {stats.kept} rows to {args.out} ({stats.summary()})")


if __name__ == "__main__":
    main()
