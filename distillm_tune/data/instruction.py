"""Instruction-following data (databricks-dolly-15k format) for training and evaluation.

Rows ``{"instruction", "context", "response", "category"}`` (``input`` is accepted for
``context``) are formatted with the paper's prompt template (spec §5), split 14k/500/500 with a
fixed seed, and tokenized into ``{"prompt": ids, "response": ids}`` samples for
``collate_prompt_response``.

Token budgets (spec §6: ``max_prompt_len`` 256, ``max_seq_len`` 512), one documented rule each:

* prompt longer than ``max_prompt_len``: the row is dropped (``long_prompt="drop"``, what the
  reference data tools do), or ``long_prompt="truncate"`` keeps the BOS (if the tokenizer puts one)
  and the last tokens up to ``max_prompt_len``, so the ``### Response:`` cue stays.
* prompt + response longer than ``max_seq_len``: the row is dropped, because a response cut before
  its EOS would teach the student never to stop; ``truncate_response=True`` keeps such rows cut to
  the budget, without EOS, as an explicit choice.

Dropped and truncated rows are counted in ``dataset.stats`` and reported in one log line.

``template="chat"`` renders the instruction (and input) as one user turn with the checkpoint's own
chat template instead (``tokenizer.apply_chat_template``, transformers' rendering): the prompt is the
conversation up to the assistant's cue, the response the assistant's text up to and including the
first stop id (end of turn / EOS) the template puts after it, so exactly one stop id ends it and
nothing the template adds after the turn is trained on.
"""

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset

from distillm_tune.data._rows import DataStats, check_on_bad_row, get_str, parse_rows, read_rows

log = logging.getLogger(__name__)

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n"
)
PROMPT_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
SPLITS = ("train", "valid", "test", "all")
TEMPLATES = ("paper", "chat")


def format_prompt(instruction: str, input: Optional[str] = None) -> str:
    """The paper's prompt (Fig. 11, reference spacing); the Input block only for a real input."""
    if input is not None and input.strip():
        return PROMPT_TEMPLATE.format(instruction=instruction, input=input)
    return PROMPT_TEMPLATE_NO_INPUT.format(instruction=instruction)


@dataclass
class InstructionExample:
    """One instruction with its optional input and the reference answers to score against."""

    instruction: str
    input: str = ""
    references: List[str] = field(default_factory=list)
    category: str = ""

    @property
    def prompt(self) -> str:
        return format_prompt(self.instruction, self.input)

    @property
    def reference(self) -> str:
        return self.references[0]


def parse_dolly_row(row: Dict[str, Any]) -> InstructionExample:
    """Validate a dolly row; raises ``ValueError`` naming the problem (caller adds file:line)."""
    instruction = get_str(row, "instruction")
    response = get_str(row, "response")
    input_key = "context" if "context" in row else "input"
    context = get_str(row, input_key, required=False)
    category = get_str(row, "category", required=False)
    return InstructionExample(instruction, context, [response], category)


def load_dolly_rows(
    source: str,
    on_bad_row: str = "error",
    hf_split: str = "train",
    stats: Optional[DataStats] = None,
) -> Tuple[List[InstructionExample], DataStats]:
    """Read and validate dolly-format rows from a local .jsonl/.json file or a `datasets` source."""
    check_on_bad_row(on_bad_row)
    stats = stats if stats is not None else DataStats()
    examples = parse_rows(read_rows(source, hf_split), parse_dolly_row, on_bad_row, stats)
    return examples, stats


def chat_messages(instruction: str, input: Optional[str] = None) -> List[Dict[str, str]]:
    """The instruction (and its input, after a blank line) as the user turn of a chat."""
    content = f"{instruction}\n\n{input}" if input is not None and input.strip() else instruction
    return [{"role": "user", "content": content}]


def encode_prompt(tokenizer, instruction: str, input: Optional[str], template: str) -> List[int]:
    """Prompt ids with ``template``: the paper's text with the tokenizer's BOS, or the chat
    rendering, which already holds whatever BOS the template writes."""
    if template == "paper":
        return tokenizer.encode(format_prompt(instruction, input), add_bos=True, add_eos=False)
    text = _chat_template(tokenizer)(chat_messages(instruction, input), add_generation_prompt=True)
    return tokenizer.encode(text, add_bos=False)


def _chat_template(tokenizer):
    render = getattr(tokenizer, "apply_chat_template", None)
    if render is None:
        raise ValueError(f"template 'chat' needs a checkpoint with tokenizer.json and a chat template; "
                         f"this checkpoint's tokenizer is a {type(tokenizer).__name__}")
    return render


def encode_chat_response(tokenizer, ex: "InstructionExample") -> List[int]:
    """The assistant turn's ids: the full rendering minus the prompt rendering, cut after its first
    stop id (an EOS is appended if the template writes none)."""
    from distillm_tune.models.tokenizer import stop_ids

    render = _chat_template(tokenizer)
    user = chat_messages(ex.instruction, ex.input)
    prompt = render(user, add_generation_prompt=True)
    full = render(user + [{"role": "assistant", "content": ex.reference}], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the prompt differently inside the full conversation "
                         f"({prompt[-40:]!r} is not a prefix of it); it cannot mask the prompt exactly")
    ids = tokenizer.encode(full[len(prompt):], add_bos=False)
    stops = set(stop_ids(tokenizer))
    end = next((i for i, t in enumerate(ids) if t in stops), None)
    return ids + [tokenizer.eos_id] if end is None else ids[: end + 1]


def encode_response(tokenizer, ex: "InstructionExample", template: str) -> List[int]:
    """The training response of ``ex``: its reference, ending in exactly one stop id (EOS for the
    paper's template; the chat template's end of turn, ``encode_chat_response``)."""
    if template == "chat":
        return encode_chat_response(tokenizer, ex)
    return tokenizer.encode(ex.reference, add_bos=False, add_eos=True)


def truncate_prompt(prompt: List[int], max_len: int, bos_id: Optional[int]) -> List[int]:
    """Keep a leading BOS and the last tokens, so the prompt still ends in ``### Response:``."""
    if len(prompt) <= max_len:
        return prompt
    keep = 1 if bos_id is not None and prompt and prompt[0] == bos_id else 0
    return prompt[:keep] + prompt[len(prompt) - (max_len - keep):]


def split_rows(
    rows: Sequence[Any], valid_size: int = 500, test_size: int = 500, seed: int = 1
) -> Tuple[List[Any], List[Any], List[Any]]:
    """Deterministic train/valid/test split (paper: dolly 15k -> 14k/500/500).

    ``random.Random(seed).shuffle`` of the indices: its algorithm is fixed across platforms and
    Python versions (unlike ``hash()``-based or torch-version-dependent shuffles). Test takes the
    first ``test_size`` shuffled indices, valid the next ``valid_size``, train the rest; each split
    keeps the original row order.
    """
    if valid_size < 0 or test_size < 0:
        raise ValueError(f"valid_size and test_size must be >= 0, got {valid_size}, {test_size}")
    if valid_size + test_size > len(rows):
        raise ValueError(
            f"valid_size + test_size = {valid_size + test_size} exceeds the {len(rows)} rows"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    test_idx = sorted(order[:test_size])
    valid_idx = sorted(order[test_size : test_size + valid_size])
    train_idx = sorted(order[test_size + valid_size :])
    return tuple([rows[i] for i in idx] for idx in (train_idx, valid_idx, test_idx))


class InstructionDataset(Dataset):
    """Tokenized ``{"prompt": ids, "response": ids}`` samples of one split of a dolly-format source.

    ``prompt = encode(format_prompt(...), add_bos=True, add_eos=False)`` and
    ``response = encode(response, add_bos=False, add_eos=True)`` (``template="paper"``), or the
    chat rendering (``template="chat"``, module docstring). ``examples[i]`` is the raw
    example (instruction, input, references) behind sample ``i``, for generation and scoring;
    ``stats`` says what was skipped, dropped or truncated (see the module docstring for the rules).
    """

    def __init__(
        self,
        source: str,
        tokenizer,
        split: str = "train",
        max_prompt_len: int = 256,
        max_seq_len: int = 512,
        valid_size: int = 500,
        test_size: int = 500,
        seed: int = 1,
        on_bad_row: str = "error",
        long_prompt: str = "drop",
        truncate_response: bool = False,
        hf_split: str = "train",
        template: str = "paper",
    ):
        if template not in TEMPLATES:
            raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
        self.template = template
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if long_prompt not in ("drop", "truncate"):
            raise ValueError(f"long_prompt must be 'drop' or 'truncate', got {long_prompt!r}")
        if not 1 <= max_prompt_len < max_seq_len:
            raise ValueError(
                f"need 1 <= max_prompt_len < max_seq_len, got {max_prompt_len}, {max_seq_len}"
            )
        examples, self.stats = load_dolly_rows(source, on_bad_row, hf_split)
        if split != "all":
            train, valid, test = split_rows(examples, valid_size, test_size, seed)
            examples = {"train": train, "valid": valid, "test": test}[split]
        self.examples: List[InstructionExample] = []
        self.samples: List[Dict[str, List[int]]] = []
        for ex in examples:
            sample = self._tokenize(ex, tokenizer, max_prompt_len, max_seq_len, long_prompt,
                                    truncate_response)
            if sample is not None:
                self.examples.append(ex)
                self.samples.append(sample)
        self.stats.kept = len(self.samples)
        log.info("instruction data %s [%s]: %s", source, split, self.stats.summary())

    def _tokenize(self, ex, tokenizer, max_prompt_len, max_seq_len, long_prompt, truncate_response):
        prompt = encode_prompt(tokenizer, ex.instruction, ex.input, self.template)
        if len(prompt) > max_prompt_len:
            if long_prompt == "drop":
                self.stats.add("dropped_long_prompt")
                return None
            self.stats.add("truncated_prompt")
            prompt = truncate_prompt(prompt, max_prompt_len, tokenizer.bos_id)
        response = encode_response(tokenizer, ex, self.template)
        budget = max_seq_len - len(prompt)
        if len(response) > budget:
            if not truncate_response:
                self.stats.add("dropped_long_response")
                return None
            self.stats.add("truncated_response")
            response = response[:budget]
        return {"prompt": prompt, "response": response}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Dict[str, List[int]]:
        return self.samples[i]


def instruction_dataset(
    tokenizer, source: str, split: str = "train", **kwargs
) -> InstructionDataset:
    """Config entry point (``_component_: distillm_tune.data.instruction_dataset``)."""
    return InstructionDataset(source, tokenizer, split=split, **kwargs)
