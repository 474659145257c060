"""Data: the one batch format (collate.py), instruction, seq2seq and pretraining-text datasets.

The ``*_dataset`` factories are the entry points for torchtune configs
(``_component_: distillm_tune.data.instruction_dataset``, tokenizer passed first).
"""

from distillm_tune.data._rows import DataStats
from distillm_tune.data.collate import CROSS_ENTROPY_IGNORE_IDX, collate_prompt_response
from distillm_tune.data.eval_sets import EvalSet, load_eval_set
from distillm_tune.data.instruction import (
    PROMPT_TEMPLATE,
    InstructionDataset,
    InstructionExample,
    format_prompt,
    instruction_dataset,
    load_dolly_rows,
    split_rows,
)
from distillm_tune.data.pretrain import PackedTextDataset, collate_packed, pretrain_dataset
from distillm_tune.data.seq2seq import Seq2SeqDataset, collate_seq2seq, seq2seq_dataset

__all__ = [
    "CROSS_ENTROPY_IGNORE_IDX",
    "DataStats",
    "EvalSet",
    "InstructionDataset",
    "InstructionExample",
    "PROMPT_TEMPLATE",
    "PackedTextDataset",
    "Seq2SeqDataset",
    "collate_packed",
    "collate_prompt_response",
    "collate_seq2seq",
    "format_prompt",
    "instruction_dataset",
    "load_dolly_rows",
    "load_eval_set",
    "pretrain_dataset",
    "seq2seq_dataset",
    "split_rows",
]
