"""Instruction-following evaluation sets (Dolly test, Self-Instruct, Vicuna, S-NI, UnNI) as jsonl.

One line per example: ``{"instruction": str, "input": str (optional), "references": [str, ...]}``.
Also accepted, so the sets can be used as they are usually distributed: ``"output"`` or
``"response"`` as a single reference, and dolly's ``"context"`` for the input. ROUGE-L is taken as
the max over the references (spec §5), so several references per example are kept as a list.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from distillm_tune.data._rows import DataStats, check_on_bad_row, get_str, parse_rows, read_rows
from distillm_tune.data.instruction import InstructionExample, truncate_prompt

_SINGLE_REFERENCE_KEYS = ("output", "response")


def parse_eval_row(row: Dict[str, Any]) -> InstructionExample:
    """Validate one eval row; raises ``ValueError`` naming the problem (caller adds file:line)."""
    instruction = get_str(row, "instruction")
    input_key = "input" if "input" in row else "context"
    input_text = get_str(row, input_key, required=False)
    if "references" in row:
        refs = row["references"]
        if not isinstance(refs, list) or not refs:
            raise ValueError("field 'references' must be a non-empty list of strings")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str) or not ref.strip():
                raise ValueError(f"references[{j}] must be a non-empty string, got {ref!r}")
    else:
        key = next((k for k in _SINGLE_REFERENCE_KEYS if k in row), None)
        if key is None:
            raise ValueError("missing field 'references' (or 'output' / 'response')")
        refs = [get_str(row, key)]
    return InstructionExample(instruction, input_text, list(refs))


@dataclass
class EvalSet:
    """Examples of one evaluation set, with their formatted prompts and reference lists."""

    name: str
    examples: List[InstructionExample]
    stats: DataStats

    @property
    def prompts(self) -> List[str]:
        return [ex.prompt for ex in self.examples]

    @property
    def references(self) -> List[List[str]]:
        return [ex.references for ex in self.examples]

    def prompt_ids(self, tokenizer, max_prompt_len: Optional[int] = None) -> List[List[int]]:
        """Prompts encoded with BOS; longer than ``max_prompt_len`` keeps BOS and the last tokens.

        Evaluation never drops an example (scores must cover the whole set), hence truncation here.
        """
        ids = [tokenizer.encode(p, add_bos=True, add_eos=False) for p in self.prompts]
        if max_prompt_len is None:
            return ids
        return [truncate_prompt(p, max_prompt_len, tokenizer.bos_id) for p in ids]

    def __len__(self) -> int:
        return len(self.examples)


def load_eval_set(
    source: str, on_bad_row: str = "error", name: Optional[str] = None, hf_split: str = "test"
) -> EvalSet:
    """Read and validate an evaluation set; bad rows raise (file:line) or are skipped, counted."""
    check_on_bad_row(on_bad_row)
    stats = DataStats()
    examples = parse_rows(read_rows(source, hf_split), parse_eval_row, on_bad_row, stats)
    stats.kept = len(examples)
    if not examples:
        raise ValueError(f"{source}: no usable examples ({stats.summary()})")
    return EvalSet(name or str(source), examples, stats)
