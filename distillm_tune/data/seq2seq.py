"""Encoder-decoder task data (paper §5 task-specific runs with T5): SAMSum and IWSLT 2017 en-de.

Rows come from local jsonl (one file per split): SAMSum ``{"dialogue", "summary"}``, IWSLT
``{"en", "de"}`` or ``{"translation": {"en", "de"}}``. Samples are ``{"source": ids, "target":
ids}``, both encoded without BOS and with EOS (T5 convention). Budgets:

* a source longer than ``max_source_len`` is cut and its EOS put back at the end (the encoder
  only has to see where the input stops; long dialogues are normal);
* a target longer than ``max_target_len`` drops the row, since a target without EOS teaches the
  decoder never to stop; ``truncate_target=True`` keeps it cut (no EOS) as an explicit choice.

``source_prefix`` is the T5 task prefix put before the source text (default per task:
``"summarize: "``, ``"translate English to German: "``); pass ``""`` for none.
"""

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

from distillm_tune.data._rows import DataStats, check_on_bad_row, get_str, parse_rows, read_rows
from distillm_tune.data.collate import CROSS_ENTROPY_IGNORE_IDX

log = logging.getLogger(__name__)

LANG_NAMES = {"en": "English", "de": "German"}
TASKS = ("samsum", "iwslt")


def parse_samsum_row(row: Dict[str, Any]) -> Tuple[str, str]:
    return get_str(row, "dialogue"), get_str(row, "summary")


def make_iwslt_parser(src_lang: str = "en", tgt_lang: str = "de"):
    """Row parser for ``{src, tgt}`` or ``{"translation": {src, tgt}}`` rows."""

    def parse(row: Dict[str, Any]) -> Tuple[str, str]:
        if "translation" in row:
            row = row["translation"]
            if not isinstance(row, dict):
                raise ValueError("field 'translation' must be an object")
        return get_str(row, src_lang), get_str(row, tgt_lang)

    return parse


class Seq2SeqDataset(Dataset):
    """``{"source": ids, "target": ids}`` samples of one SAMSum / IWSLT file (rules: module doc).

    ``source_texts`` / ``target_texts`` hold the raw strings behind each kept sample (the targets
    are the references for ROUGE-L / BLEU); ``stats`` counts skipped, dropped and truncated rows.
    """

    def __init__(
        self,
        source: str,
        tokenizer,
        task: str = "samsum",
        max_source_len: int = 512,
        max_target_len: int = 128,
        source_prefix: Optional[str] = None,
        src_lang: str = "en",
        tgt_lang: str = "de",
        on_bad_row: str = "error",
        truncate_target: bool = False,
        hf_split: str = "train",
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if max_source_len < 2 or max_target_len < 1:
            raise ValueError(
                f"need max_source_len >= 2 and max_target_len >= 1, got {max_source_len}, "
                f"{max_target_len}"
            )
        if tokenizer.eos_id is None:
            raise ValueError("the tokenizer has no eos_id; sources and targets end in EOS")
        check_on_bad_row(on_bad_row)
        if task == "samsum":
            parse, default_prefix = parse_samsum_row, "summarize: "
        else:
            for lang in (src_lang, tgt_lang):
                if lang not in LANG_NAMES:
                    raise ValueError(f"language must be one of {sorted(LANG_NAMES)}, got {lang!r}")
            parse = make_iwslt_parser(src_lang, tgt_lang)
            default_prefix = f"translate {LANG_NAMES[src_lang]} to {LANG_NAMES[tgt_lang]}: "
        prefix = default_prefix if source_prefix is None else source_prefix
        self.stats = DataStats()
        pairs = parse_rows(read_rows(source, hf_split), parse, on_bad_row, self.stats)
        self.samples: List[Dict[str, List[int]]] = []
        self.source_texts: List[str] = []
        self.target_texts: List[str] = []
        eos = tokenizer.eos_id
        for src_text, tgt_text in pairs:
            src = tokenizer.encode(prefix + src_text, add_bos=False, add_eos=True)
            tgt = tokenizer.encode(tgt_text, add_bos=False, add_eos=True)
            if len(tgt) > max_target_len:
                if not truncate_target:
                    self.stats.add("dropped_long_target")
                    continue
                self.stats.add("truncated_target")
                tgt = tgt[:max_target_len]
            if len(src) > max_source_len:
                self.stats.add("truncated_source")
                src = src[: max_source_len - 1] + [eos]
            self.samples.append({"source": src, "target": tgt})
            self.source_texts.append(src_text)
            self.target_texts.append(tgt_text)
        self.stats.kept = len(self.samples)
        log.info("%s data %s: %s", task, source, self.stats.summary())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Dict[str, List[int]]:
        return self.samples[i]


def collate_seq2seq(
    samples: Sequence[Dict[str, List[int]]],
    pad_id: int,
    decoder_start_id: int = 0,
    ignore_index: int = CROSS_ENTROPY_IGNORE_IDX,
) -> Dict[str, object]:
    """Right-pad ``{"source", "target"}`` samples into an encoder-decoder batch.

    ``input_ids [B, S]`` (padded with ``pad_id``), ``encoder_padding_mask [B, S]`` (True = real
    token), ``decoder_input_ids [B, T]`` = decoder start token + target[:-1] (teacher forcing),
    ``labels [B, T]`` = target, padding ``ignore_index`` — so ``labels[:, t]`` is what the logits
    at decoder position ``t`` predict, like the decoder-only format. ``sources``: the id lists.
    """
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    for i, s in enumerate(samples):
        if len(s["source"]) == 0 or len(s["target"]) == 0:
            raise ValueError(f"sample {i} has an empty source or target")
    b = len(samples)
    s_len = max(len(s["source"]) for s in samples)
    t_len = max(len(s["target"]) for s in samples)
    input_ids = torch.full((b, s_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, s_len), dtype=torch.bool)
    dec_in = torch.full((b, t_len), pad_id, dtype=torch.long)
    labels = torch.full((b, t_len), ignore_index, dtype=torch.long)
    for i, s in enumerate(samples):
        src, tgt = list(s["source"]), list(s["target"])
        input_ids[i, : len(src)] = torch.tensor(src, dtype=torch.long)
        mask[i, : len(src)] = True
        dec_in[i, : len(tgt)] = torch.tensor([decoder_start_id] + tgt[:-1], dtype=torch.long)
        labels[i, : len(tgt)] = torch.tensor(tgt, dtype=torch.long)
    return {
        "input_ids": input_ids,
        "encoder_padding_mask": mask,
        "decoder_input_ids": dec_in,
        "labels": labels,
        "sources": [list(s["source"]) for s in samples],
    }


def seq2seq_dataset(tokenizer, source: str, task: str = "samsum", **kwargs) -> Seq2SeqDataset:
    """Config entry point (``_component_: distillm_tune.data.seq2seq_dataset``)."""
    return Seq2SeqDataset(source, tokenizer, task=task, **kwargs)
