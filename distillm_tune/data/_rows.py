"""Reading raw rows (dicts) from local files or `datasets`, each tagged with where it came from.

Every loader in this package validates rows against its own schema; what they share is the
reading and the bookkeeping: a row carries a location (``file.jsonl:12``, 1-based line) so a bad
row can be reported where the user can find it, and ``on_bad_row="skip"`` counts instead of
failing. Real corpora are read from local paths; a ``datasets`` name only works if it is already
in the local cache (tests and CI run with ``HF_DATASETS_OFFLINE=1``).
"""

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

log = logging.getLogger(__name__)

Row = Tuple[str, Dict[str, Any]]  # (location, row)
ON_BAD_ROW = ("error", "skip")


@dataclass
class DataStats:
    """What a loader read, kept, skipped, dropped and truncated, per reason.

    ``counts`` maps a reason (e.g. ``"bad_row"``, ``"dropped_long_prompt"``) to a count, so the
    numbers the user sees in the log line are the ones tests and recipes can read back.
    """

    rows_read: int = 0
    kept: int = 0
    counts: Dict[str, int] = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def get(self, reason: str) -> int:
        return self.counts.get(reason, 0)

    def summary(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))
        return f"read {self.rows_read} rows, kept {self.kept}" + (f" ({extra})" if extra else "")


def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {ON_BAD_ROW}, got {on_bad_row!r}")


def _read_json_file(path: str) -> List[Row]:
    """A ``.json`` file holding a list of rows, or JSON lines under a ``.json`` name."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte {e.start}); expected UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # `datasets` also accepts JSON lines named .json
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return [(f"{path}: row {i + 1}", row) for i, row in enumerate(data)]


def _read_jsonl(path: str) -> List[Row]:
    rows = []
    # bytes, decoded line by line: a non-UTF-8 line is a bad row with its line number, not a
    # UnicodeDecodeError for the whole file
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            loc = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append((loc, _Unparsable(f"not UTF-8 text at byte {e.start} of the line")))
                continue
            if not line.strip():
                continue
            try:
                rows.append((loc, json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((loc, _Unparsable(f"not valid JSON ({e})")))
    return rows


class _Unparsable(dict):
    """A line that is not JSON (or not UTF-8): kept as a row so the schema check reports it with its location."""

    def __init__(self, error: str):
        super().__init__()
        self.error = error


def read_rows(source: str, split: str = "train") -> List[Row]:
    """Rows of a ``.jsonl`` / ``.json`` file, a ``save_to_disk`` folder, or a ``datasets`` name.

    ``split`` only applies to ``datasets`` sources (local files are one split each).
    """
    source = os.fspath(source)
    if os.path.isfile(source):
        if source.endswith(".jsonl"):
            return _read_jsonl(source)
        if source.endswith(".json"):
            return _read_json_file(source)
        raise ValueError(f"{source}: expected a .jsonl or .json file")
    import datasets  # only needed for hub-style sources

    if os.path.isdir(source) and os.path.exists(os.path.join(source, "dataset_info.json")):
        ds = datasets.load_from_disk(source)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(source, split=split)
    return [(f"{source}[{split}]: row {i + 1}", dict(row)) for i, row in enumerate(ds)]


def parse_rows(rows: List[Row], parse, on_bad_row: str, stats: DataStats) -> List[Any]:
    """Apply ``parse(row) -> item`` (raising ``ValueError(problem)``) to every row.

    With ``on_bad_row="error"`` the first bad row raises a ``ValueError`` naming its location and
    the problem; with ``"skip"`` bad rows are counted under ``stats.counts["bad_row"]`` and logged.
    """
    check_on_bad_row(on_bad_row)
    out = []
    for loc, row in rows:
        stats.rows_read += 1
        try:
            if isinstance(row, _Unparsable):
                raise ValueError(row.error)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
            out.append(parse(row))
        except ValueError as e:
            if on_bad_row == "error":
                raise ValueError(f"{loc}: {e}") from None
            stats.add("bad_row")
            log.debug("skipping %s: %s", loc, e)
    if stats.get("bad_row"):
        log.warning("skipped %d malformed rows", stats.get("bad_row"))
    return out


def get_str(row: Dict[str, Any], key: str, required: bool = True) -> str:
    """A string field; required ones must be non-empty after stripping whitespace."""
    if key not in row or row[key] is None:
        if required:
            raise ValueError(f"missing field {key!r}")
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise ValueError(f"field {key!r} is empty")
    return value
