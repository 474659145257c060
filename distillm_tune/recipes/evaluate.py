"""Evaluate a checkpoint the way the paper reports results (DISTILLM_SPEC §5).

    tune run distillm_tune/recipes/evaluate --config configs/evaluate_tiny.yaml key=value ...

Protocol, and why each choice:

* ``kind: instruction`` sets (Dolly test, Self-Instruct, Vicuna, S-NI, UnNI): sample with
  ``temperature`` 1.0 / ``top_p`` 1.0 once per seed of ``seeds`` ({10,20,30,40,50}); prompts longer
  than ``max_prompt_len`` keep BOS and their last tokens (scores must cover every example);
  ``max_new_tokens = max_seq_len - max_prompt_len`` (512 - 256), so no sequence outgrows the
  budget the model was trained with. Reported: ROUGE-L mean ± std (population, ddof 0) over seeds.
* ``kind: summarization`` / ``translation`` (SAMSum, IWSLT): greedy decoding, at most
  ``greedy_max_new_tokens`` (128) new tokens, one run. ROUGE-L; translation also corpus BLEU.
* ROUGE-L is ``distillm_tune.eval.metrics.rouge_l`` (rouge_score with stemming, F × 100, max over
  references, mean over examples): any other implementation would not be comparable with the paper.
* Each (dataset, seed) run draws from its own ``torch.Generator`` seeded with the seed, so a
  dataset's generations do not depend on which other datasets or seeds are evaluated; batches keep
  file order. Same config + same seed = same generations (for the same ``batch_size`` and device).

Decoder-only models (GPT-2, OPT, Llama) generate with the batched KV-cached sampler
(``sgo.sampler.generate_responses``, greedy = temperature 0); encoder-decoder models (T5) with
``generate_seq2seq``. Generated ids are cut at the first EOS, decoded and stripped.

Rows: instruction sets are read by ``data.eval_sets.load_eval_set`` (``references`` / ``output`` /
``response``; ``input`` / ``context``). Summarization / translation sets take SAMSum rows
``{dialogue, summary}`` or IWSLT rows ``{en, de}`` / ``{translation: {en, de}}`` (``src_lang`` /
``tgt_lang`` per dataset), or instruction-format rows. A T5 model sees ``source_prefix + source``
(default ``"summarize: "`` / ``"translate English to German: "``, as in training); a decoder-only
model sees the paper's prompt template with ``instruction`` (per dataset, a default per kind) and
the source as input. Decoder-only prompts of every kind are cut to ``max_prompt_len`` (BOS and the
last tokens kept), encoder inputs to ``max_source_len`` (EOS kept).

Config keys: ``model_dir`` (HF checkpoint dir, any registered family), ``tokenizer_dir`` (default
``model_dir``), ``datasets`` (list of ``{name, path, kind}`` plus the optional per-dataset keys
above), ``seeds``, ``temperature``, ``top_p``, ``max_seq_len``, ``max_prompt_len``,
``greedy_max_new_tokens``, ``max_source_len`` (T5 encoder input budget), ``batch_size``, ``dtype``,
``device``, ``output_dir``, ``max_examples`` (first N examples per dataset, for quick runs),
``template`` (``paper``, default, or ``chat``: the checkpoint's chat template, as ``dataset.template``
in training), ``on_bad_row`` (``error``, default, or ``skip``: malformed rows such as an empty
reference are counted and left out, as in training), ``decoding`` (``sampling``, the paper's seeds,
or ``greedy``: one temperature-0 run of the instruction sets too).

Outputs in ``output_dir``: ``results.json`` (per dataset: kind, n, decoding, per metric the
per-seed values, mean and std), ``results.md`` (dataset | metric | mean ± std | n) and
``generations.jsonl`` (dataset, seed (null when greedy), index, prompt, generation, references).
Files are written to a temporary name and renamed, so a crashed run never leaves partial results.
"""

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils
from tqdm import tqdm

from distillm_tune.recipes.schema import EvaluateConfig
from distillm_tune.training.settings import check_schema, read_schema
from distillm_tune.data._rows import DataStats, check_on_bad_row, parse_rows, read_rows
from distillm_tune.data.eval_sets import parse_eval_row
from distillm_tune.data.instruction import TEMPLATES, chat_messages, format_prompt, truncate_prompt
from distillm_tune.data.seq2seq import LANG_NAMES, make_iwslt_parser, parse_samsum_row
from distillm_tune.eval.metrics import bleu, mean_std, rouge_l
from distillm_tune.models._registry import family_for
from distillm_tune.models.hf import load_hf, load_hf_tokenizer, read_hf_config
from distillm_tune.models.tokenizer import cut_at_stop, stop_ids
from distillm_tune.models.t5._model import generate_seq2seq
from distillm_tune.sgo.sampler import generate_responses

log = utils.get_logger("INFO")

KINDS = ("instruction", "summarization", "translation")
METRICS = {"instruction": ("rougeL",), "summarization": ("rougeL",),
           "translation": ("bleu", "rougeL")}
METRIC_NAMES = {"rougeL": "ROUGE-L", "bleu": "BLEU"}
DEFAULT_INSTRUCTION = {"summarization": "Summarize the dialogue.",
                       "translation": "Translate the {src} text to {tgt}."}
DEFAULT_PREFIX = {"summarization": "summarize: ", "translation": "translate {src} to {tgt}: "}


@dataclass
class EvalTask:
    """One dataset ready to generate for: prompt texts, their token ids and the references."""

    name: str
    kind: str
    path: str
    prompts: List[str]
    prompt_ids: List[List[int]]
    references: List[List[str]]
    stats: DataStats
    greedy: bool = False  # summarization / translation always; instruction with decoding: greedy


def _row_parser(entry: Dict[str, Any], seq2seq: bool, render: Callable[[str, str], str] = format_prompt):
    """``row -> (prompt text, references)`` for one dataset entry (rules: module docstring);
    ``render(instruction, input)`` is the decoder-only prompt (paper template or chat)."""
    kind = entry["kind"]

    def instruction_row(row):
        ex = parse_eval_row(row)
        return render(ex.instruction, ex.input), ex.references

    if kind == "instruction":
        return instruction_row
    src, tgt = entry.get("src_lang", "en"), entry.get("tgt_lang", "de")
    if kind == "translation":
        for key, lang in (("src_lang", src), ("tgt_lang", tgt)):
            if lang not in LANG_NAMES:
                raise ValueError(f"datasets[name={entry['name']}].{key} must be one of "
                                 f"{sorted(LANG_NAMES)}, got {lang!r}")
    names = {"src": LANG_NAMES.get(src, src), "tgt": LANG_NAMES.get(tgt, tgt)}
    pair = parse_samsum_row if kind == "summarization" else make_iwslt_parser(src, tgt)
    prefix = entry.get("source_prefix")  # "" means no prefix
    prefix = DEFAULT_PREFIX[kind].format(**names) if prefix is None else prefix
    instruction = entry.get("instruction") or DEFAULT_INSTRUCTION[kind].format(**names)

    def task_row(row):
        if "instruction" in row:
            return instruction_row(row)
        source, target = pair(row)
        prompt = prefix + source if seq2seq else render(instruction, source)
        return prompt, [target]

    return task_row


def _write_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


SCHEMA = read_schema(EvaluateConfig)  # every key, its type, range and default (recipes/schema.py)


def check_config(cfg: DictConfig) -> DictConfig:
    """Keys, types and ranges, before anything is read (also ``distillm-tune validate``); returns
    ``cfg`` with every absent key set to its default."""
    cfg = check_schema(cfg, SCHEMA)
    if cfg.max_prompt_len >= cfg.max_seq_len:
        raise ValueError(f"config max_prompt_len: must be below max_seq_len={cfg.max_seq_len}, got {cfg.max_prompt_len}")
    return cfg


class EvaluateRecipe:
    """Generate for every dataset (and seed), score, write results (module docstring)."""

    def __init__(self, cfg: DictConfig) -> None:
        cfg = check_config(cfg)
        self.cfg = cfg
        self.model_dir = self._existing_dir(cfg, "model_dir")
        self.tokenizer_dir = (self._existing_dir(cfg, "tokenizer_dir")
                              if cfg.get("tokenizer_dir") else self.model_dir)
        self.hf_config = read_hf_config(self.model_dir)
        self.seq2seq = family_for(self.hf_config.get("model_type", "")).is_encoder_decoder
        self.entries = self._check_datasets(cfg.get("datasets"))
        self.on_bad_row = str(cfg.get("on_bad_row", "error"))
        check_on_bad_row(self.on_bad_row)
        self.decoding = str(cfg.get("decoding", "sampling"))
        if self.decoding not in ("sampling", "greedy"):
            raise ValueError(f"decoding must be 'sampling' (the paper's seeds) or 'greedy', got {self.decoding!r}")
        self.template = str(cfg.get("template", "paper"))
        if self.template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {self.template!r}")
        self.parsers = [_row_parser(e, self.seq2seq, self._render) for e in self.entries]  # checks languages
        self.seeds = [int(s) for s in cfg.get("seeds", [10, 20, 30, 40, 50])]
        self.temperature = float(cfg.get("temperature", 1.0))
        self.top_p = float(cfg.get("top_p", 1.0))
        self.max_seq_len = int(cfg.get("max_seq_len", 512))
        self.max_prompt_len = int(cfg.get("max_prompt_len", 256))
        self.greedy_new = int(cfg.get("greedy_max_new_tokens", 128))
        self.max_source_len = int(cfg.get("max_source_len", 512))
        self.batch_size = int(cfg.get("batch_size", 16))
        self.max_examples = cfg.get("max_examples")
        if cfg.get("output_dir") in (None, ""):
            raise ValueError("output_dir must be set (where results.json etc. are written)")
        self.output_dir = str(cfg.output_dir)
        if not 1 <= self.max_prompt_len < self.max_seq_len:
            raise ValueError(f"need 1 <= max_prompt_len < max_seq_len, got max_prompt_len="
                             f"{self.max_prompt_len}, max_seq_len={self.max_seq_len}")
        if self.batch_size < 1 or self.greedy_new < 1 or self.max_source_len < 2:
            raise ValueError("batch_size and greedy_max_new_tokens must be >= 1, max_source_len >= 2")
        if any(e["kind"] == "instruction" for e in self.entries) and not self.seeds:
            raise ValueError("seeds must be a non-empty list for instruction datasets")
        if self.max_examples is not None and int(self.max_examples) < 1:
            raise ValueError(f"max_examples must be null or >= 1, got {self.max_examples}")

    @staticmethod
    def _existing_dir(cfg: DictConfig, key: str) -> str:
        path = cfg.get(key)
        if path in (None, ""):
            raise ValueError(f"{key} must be set to a Hugging Face checkpoint directory")
        if not os.path.isdir(str(path)):
            raise FileNotFoundError(f"{key}: directory {str(path)!r} does not exist")
        if not os.path.isfile(os.path.join(str(path), "config.json")):
            raise FileNotFoundError(f"{key}: {str(path)!r} has no config.json (not an HF checkpoint)")
        return str(path)

    @staticmethod
    def _check_datasets(datasets) -> List[Dict[str, Any]]:
        if not datasets:
            raise ValueError("datasets must be a non-empty list of {name, path, kind}")
        entries, names = [], set()
        for i, raw in enumerate(datasets):
            entry = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else dict(raw)
            for key in ("name", "path", "kind"):
                if not entry.get(key):
                    raise ValueError(f"datasets[{i}].{key} is missing")
            if entry["kind"] not in KINDS:
                raise ValueError(f"datasets[{i}].kind must be one of {KINDS}, got {entry['kind']!r}")
            if entry["name"] in names:
                raise ValueError(f"datasets[{i}].name {entry['name']!r} is used twice")
            if not os.path.isfile(str(entry["path"])):
                raise FileNotFoundError(f"datasets[{i}].path: file {entry['path']!r} does not exist")
            names.add(entry["name"])
            entries.append(entry)
        return entries

    # ------------------------------------------------------------------ setup

    def preflight(self, dry_run: bool = False) -> None:
        """What can be checked without the model (also ``distillm-tune validate``): the tokenizer
        and every dataset read, parsed and encoded (an empty, malformed or unusable file is
        refused here, not after the model has loaded). It writes nothing, so ``dry_run``, the
        training recipe's switch, changes nothing here."""
        self.device = utils.get_device(self.cfg.get("device", "cpu"))
        self.dtype = training.get_dtype(self.cfg.get("dtype", "fp32"), self.device)
        self.tokenizer = load_hf_tokenizer(self.tokenizer_dir)
        self.tasks = [self._load_task(e, p) for e, p in zip(self.entries, self.parsers)]

    def setup(self) -> None:
        self.preflight()
        try:  # refuses a checkpoint with NaN/inf weights, naming the tensor
            self.model = load_hf(self.model_dir, dtype=self.dtype).to(self.device).eval()
        except ValueError as e:
            raise ValueError(f"model_dir: {e}") from None
        if not self.seq2seq:
            self._check_model_length()
        log.info("model %s (%s), %d datasets: %s", self.model_dir,
                 "encoder-decoder" if self.seq2seq else "decoder-only", len(self.tasks),
                 ", ".join(f"{t.name} ({len(t.prompts)})" for t in self.tasks))

    def _check_model_length(self) -> None:
        limit = getattr(self.model, "max_seq_len", None)
        greedy_total = self.max_prompt_len + self.greedy_new
        need = max(self.max_seq_len if any(e["kind"] == "instruction" for e in self.entries) else 0,
                   greedy_total if any(e["kind"] != "instruction" for e in self.entries) else 0)
        if limit is not None and need > limit:
            raise ValueError(
                f"the model has {limit} positions but max_seq_len={self.max_seq_len} / "
                f"max_prompt_len + greedy_max_new_tokens={greedy_total} need {need}; lower them")

    def _load_task(self, entry: Dict[str, Any], parser) -> EvalTask:
        stats = DataStats()
        rows = parse_rows(read_rows(str(entry["path"]), "test"), parser, self.on_bad_row, stats)
        if self.max_examples is not None:
            rows = rows[: int(self.max_examples)]
        if not rows:
            raise ValueError(f"dataset {entry['name']!r} ({entry['path']}) has no examples")
        prompt_ids = [self._encode(prompt, stats) for prompt, _ in rows]
        stats.kept = len(rows)
        return EvalTask(entry["name"], entry["kind"], str(entry["path"]), [p for p, _ in rows],
                        prompt_ids, [r for _, r in rows], stats,
                        greedy=entry["kind"] != "instruction" or self.decoding == "greedy")

    def _render(self, instruction: str, input: str) -> str:
        """The decoder-only prompt text: the paper's template, or the checkpoint's chat template
        rendered as in training (``data.instruction.chat_messages``)."""
        if self.template == "paper":
            return format_prompt(instruction, input)
        return self.tokenizer.apply_chat_template(chat_messages(instruction, input), add_generation_prompt=True)

    def _encode(self, prompt: str, stats: DataStats) -> List[int]:
        """Prompt ids within budget; evaluation cuts (never drops) so scores cover every example."""
        if self.seq2seq:  # T5: no BOS, EOS-terminated source; a cut source keeps its EOS
            ids = self.tokenizer.encode(prompt, add_bos=False, add_eos=True)
            if len(ids) <= self.max_source_len:
                return ids
            stats.add("truncated_prompt")
            return ids[: self.max_source_len - 1] + [self.tokenizer.eos_id]
        # a chat rendering already holds whatever BOS its template writes
        ids = self.tokenizer.encode(prompt, add_bos=self.template == "paper", add_eos=False)
        if len(ids) <= self.max_prompt_len:
            return ids
        stats.add("truncated_prompt")  # keeps BOS and the "### Response:" cue at the end
        return truncate_prompt(ids, self.max_prompt_len, self.tokenizer.bos_id)

    # ------------------------------------------------------------------ generation

    def generate(self, task: EvalTask, seed: Optional[int]) -> List[str]:
        """Decoded generations for every prompt of ``task`` (``seed`` None = greedy)."""
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        new_tokens = self.greedy_new if task.kind != "instruction" else self.max_seq_len - self.max_prompt_len
        temperature = 0.0 if task.greedy else self.temperature
        stops, pad = stop_ids(self.tokenizer), self.tokenizer.pad_id
        texts = []
        batches = range(0, len(task.prompt_ids), self.batch_size)
        for start in tqdm(batches, desc=f"{task.name} seed={seed}", file=sys.stderr,
                          leave=False):
            batch = task.prompt_ids[start : start + self.batch_size]
            if self.seq2seq:
                rows = self._generate_seq2seq(batch, new_tokens, temperature, generator)
            else:
                rows = [s["response"] for s in generate_responses(
                    self.model, batch, max_new_tokens=new_tokens, eos_ids=stops, pad_id=pad,
                    temperature=temperature, top_p=self.top_p, generator=generator)]
            texts += [self.tokenizer.decode(cut_at_stop(r, stops)).strip() for r in rows]
        return texts

    def _generate_seq2seq(self, batch, new_tokens, temperature, generator) -> List[List[int]]:
        width = max(len(p) for p in batch)
        input_ids = torch.full((len(batch), width), self.tokenizer.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.bool)  # True = real token
        for i, p in enumerate(batch):
            input_ids[i, : len(p)] = torch.tensor(p)
            mask[i, : len(p)] = True
        out = generate_seq2seq(
            self.model, input_ids.to(self.device), mask.to(self.device),
            max_new_tokens=new_tokens,
            decoder_start_token_id=self.hf_config.get("decoder_start_token_id", 0),
            eos_id=self.tokenizer.eos_id, pad_id=self.tokenizer.pad_id,
            temperature=temperature, greedy=temperature == 0.0,
            top_p=self.top_p, generator=generator)
        return out.tolist()

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> Dict[str, Any]:
        os.makedirs(self.output_dir, exist_ok=True)
        gen_path = os.path.join(self.output_dir, "generations.jsonl")
        results: Dict[str, Any] = {}
        with open(gen_path + ".tmp", "w", encoding="utf-8") as gen_file:
            for task in self.tasks:
                results[task.name] = self._evaluate_task(task, gen_file)
        os.replace(gen_path + ".tmp", gen_path)
        summary = {"model_dir": self.model_dir, "settings": self._settings(), "datasets": results}
        _write_atomic(os.path.join(self.output_dir, "results.json"),
                      json.dumps(summary, indent=2) + "\n")
        _write_atomic(os.path.join(self.output_dir, "results.md"), self._markdown(results))
        log.info("results written to %s\n%s", self.output_dir, self._markdown(results))
        return summary

    def _evaluate_task(self, task: EvalTask, gen_file) -> Dict[str, Any]:
        seeds = [None] if task.greedy else self.seeds
        per_seed: Dict[str, Dict[str, float]] = {m: {} for m in METRICS[task.kind]}
        for seed in seeds:
            start = time.perf_counter()
            texts = self.generate(task, seed)
            for i, (prompt, text, refs) in enumerate(zip(task.prompts, texts, task.references)):
                gen_file.write(json.dumps({"dataset": task.name, "seed": seed, "index": i,
                                           "prompt": prompt, "generation": text,
                                           "references": refs}) + "\n")
            key = "greedy" if seed is None else str(seed)
            for metric in per_seed:
                score = rouge_l if metric == "rougeL" else bleu
                per_seed[metric][key] = score(texts, task.references)
            log.info("%s seed=%s: %s (%d examples, %.1fs)", task.name, key,
                     ", ".join(f"{METRIC_NAMES[m]} {v[key]:.2f}" for m, v in per_seed.items()),
                     len(texts), time.perf_counter() - start)
        metrics = {}
        for metric, values in per_seed.items():
            mean, std = mean_std(list(values.values()))
            metrics[metric] = {"per_seed": values, "mean": mean, "std": std}
        return {"kind": task.kind, "path": task.path, "n": len(task.prompts),
                "decoding": "greedy" if task.greedy else "sampling",
                "prompts_truncated": task.stats.get("truncated_prompt"), "metrics": metrics}

    def _settings(self) -> Dict[str, Any]:
        return {"seeds": self.seeds, "temperature": self.temperature, "top_p": self.top_p,
                "max_seq_len": self.max_seq_len, "max_prompt_len": self.max_prompt_len,
                "greedy_max_new_tokens": self.greedy_new, "max_source_len": self.max_source_len,
                "batch_size": self.batch_size, "dtype": str(self.dtype), "std_ddof": 0,
                "max_examples": self.max_examples}

    @staticmethod
    def _markdown(results: Dict[str, Any]) -> str:
        lines = ["| dataset | metric | mean ± std | n |", "|---|---|---|---|"]
        for name, res in results.items():
            for metric, m in res["metrics"].items():
                lines.append(f"| {name} | {METRIC_NAMES[metric]} | {m['mean']:.2f} ± "
                             f"{m['std']:.2f} | {res['n']} |")
        return "\n".join(lines) + "\n"

    def cleanup(self) -> None:
        self.model = None


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    recipe = EvaluateRecipe(cfg)
    recipe.setup()
    recipe.evaluate()
    recipe.cleanup()


if __name__ == "__main__":
    sys.exit(recipe_main())
