"""Type and range checks of a recipe's settings, run before any model or data is loaded.

Each :class:`Rule` names a dotted config key; :func:`check_settings` reports the first value that
breaks its rule as ``config KEY: expected ..., got VALUE`` (a ``ValueError``), so ``batch_size=abc``
or ``validation.batch_size=0`` stop the run at once instead of as a ``ZeroDivisionError`` after an
epoch.
"""

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf


@dataclass(frozen=True)
class Rule:
    key: str
    kind: type  # int, float, str or bool
    low: Optional[float] = None  # inclusive unless low_open
    high: Optional[float] = None  # inclusive
    low_open: bool = False
    optional: bool = True  # null (or absent: the recipe's default applies) is allowed
    choices: tuple = ()

    def expected(self) -> str:
        if self.choices:
            return f"one of {list(self.choices)}"
        if self.kind is bool:
            return "true or false"
        what = {int: "an integer", float: "a number", str: "a string"}[self.kind]
        if self.low is not None and self.high is not None:
            what += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        elif self.low is not None:
            what += f" {'>' if self.low_open else '>='} {self.low:g}"
        return what + (" or null" if self.optional else "")

    def accepts(self, value: Any) -> bool:
        if self.choices:
            return value in self.choices
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, float) if self.kind is float else self.kind):
            return False
        if self.kind is float and not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or value <= self.high


def check_settings(cfg: DictConfig, rules: Iterable[Rule]) -> None:
    for rule in rules:
        value = OmegaConf.select(cfg, rule.key, default=None, throw_on_missing=False)
        if value is None or value == "???":
            if rule.optional:
                continue
            raise ValueError(f"config {rule.key}: required, expected {rule.expected()}")
        if not rule.accepts(value):
            raise ValueError(f"config {rule.key}: expected {rule.expected()}, got {value!r}")
