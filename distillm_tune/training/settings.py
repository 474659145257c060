"""Type and range checks of a recipe's settings, run before any model or data is loaded.

Each :class:`Rule` names a dotted config key; :func:`check_settings` reports the first value that
breaks its rule as ``config KEY: expected ..., got VALUE`` (a ``ValueError``), so ``batch_size=abc``
or ``validation.batch_size=0`` stop the run at once instead of as a ``ZeroDivisionError`` after an
epoch.
"""

import difflib
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

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


def _interpolated_names(tree: Any) -> set:
    """Top-level names used in ``${name...}`` interpolations anywhere in a raw config."""
    names = set()
    if isinstance(tree, dict):
        for value in tree.values():
            names |= _interpolated_names(value)
    elif isinstance(tree, list):
        for value in tree:
            names |= _interpolated_names(value)
    elif isinstance(tree, str):
        names |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", tree))
    return names


def check_known_keys(cfg: DictConfig, known: Iterable[str], torchtune_keys: Iterable[str] = ()) -> None:
    """Refuse keys the recipe does not read, suggesting the nearest known one (``batch_sise`` ->
    ``batch_size``, ``sgo.phi_0`` -> ``sgo.phi0``), so that a misspelt override never runs with
    its default silently.

    ``known`` lists dotted keys; ``"a.*"`` allows any keys below ``a`` (a component's arguments).
    A top-level key that only feeds interpolations (``assets_dir`` in ``${assets_dir}/student``)
    is allowed. ``torchtune_keys`` are keys of torchtune's recipes this recipe does not implement:
    they are accepted when off (false, null, or ``enabled: false``) and refused otherwise.
    """
    known = list(known)
    free = tuple(k[:-2] for k in known if k.endswith(".*"))
    exact = {k for k in known if not k.endswith(".*")}
    parents = {".".join(k.split(".")[:i]) for k in exact | set(free) for i in range(1, k.count(".") + 1)}
    raw = OmegaConf.to_container(cfg, resolve=False)
    variables = _interpolated_names(raw)

    def walk(tree: Dict[str, Any], prefix: str) -> None:
        for key, value in tree.items():
            dotted = f"{prefix}{key}"
            if dotted in free or dotted.startswith(tuple(f + "." for f in free)):
                continue
            if dotted in torchtune_keys:
                off = not value or (isinstance(value, dict) and not value.get("enabled", False))
                if not off:
                    raise ValueError(f"config {dotted}: torchtune's {dotted!r} is not supported by this recipe yet; "
                                     f"remove it or set it off, got {value!r}")
                continue
            if dotted in parents and isinstance(value, dict):
                walk(value, dotted + ".")
                continue
            if dotted in exact or dotted in parents or (not prefix and key in variables):
                continue
            siblings = [k[len(prefix):].split(".")[0] for k in exact | set(free) | parents if k.startswith(prefix)]
            close = difflib.get_close_matches(str(key), sorted(set(siblings)), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            listing = f" (keys of {prefix[:-1]}: {', '.join(sorted(set(siblings)))})" if prefix else ""
            raise ValueError(f"config {dotted}: unknown key{hint}{listing}")

    walk(raw, "")
