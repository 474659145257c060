"""Type and range checks of a recipe's settings, run before any model or data is loaded.

Each :class:`Rule` names a dotted config key; :func:`check_settings` reports the first value that
breaks its rule as ``config KEY: expected ..., got VALUE`` (a ``ValueError``), so ``batch_size=abc``
or ``validation.batch_size=0`` stop the run at once instead of as a ``ZeroDivisionError`` after an
epoch.
"""

import copy
import difflib
import inspect
import math
import re
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

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
            parent = rule.key.rpartition(".")[0]
            if rule.optional or (parent and OmegaConf.select(cfg, parent, default=None) is None):
                continue  # null allowed, or the rule's whole section is off
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


def check_known_keys(cfg: DictConfig, known: Iterable[str], torchtune_keys: Iterable[str] = (),
                     hints: Iterable[str] = ()) -> None:
    """Refuse keys the recipe does not read, suggesting the nearest known one (``batch_sise`` ->
    ``batch_size``, ``sgo.phi_0`` -> ``sgo.phi0``), so that a misspelt override never runs with
    its default silently.

    ``known`` lists dotted keys; ``"a.*"`` allows any keys below ``a`` (a component's arguments).
    A top-level key that only feeds interpolations (``assets_dir`` in ``${assets_dir}/student``)
    is allowed. ``torchtune_keys`` are keys of torchtune's recipes this recipe does not implement:
    they are accepted when off (false, null, or ``enabled: false``) and refused otherwise.
    ``hints``: further dotted keys to suggest (a component's typed arguments).
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
            if not close:  # a key that moved one level down (sgo.phi0 -> sgo.scheduler.phi0)
                deeper = {k.rsplit(".", 1)[-1]: k for k in sorted(exact | set(hints), reverse=True)
                          if k.startswith(prefix) and not k.endswith("*")}
                close = difflib.get_close_matches(str(key), sorted(deeper), n=1, cutoff=0.6)
                hint = f"; did you mean {deeper[close[0]]}?" if close else ""
            listing = f" (keys of {prefix[:-1]}: {', '.join(sorted(set(siblings)))})" if prefix else ""
            raise ValueError(f"config {dotted}: unknown key{hint}{listing}")

    walk(raw, "")


# ----------------------------------------------------------------------------------- schemas
# A recipe's keys as nested dataclasses: each field's type, default and allowed range in one place.
# ``Component`` fields hold a ``_component_`` node whose arguments are checked when it is built.

Component = Dict[str, Any]


def setting(default: Any = MISSING, *, low: Optional[float] = None, high: Optional[float] = None,
            low_open: bool = False, choices: tuple = (), doc: str = ""):
    """A schema field: its default (absent: required) and the range or choices it accepts."""
    meta = {"low": low, "high": high, "low_open": low_open, "choices": tuple(choices), "doc": doc}
    if isinstance(default, (dict, list)) or is_dataclass(default):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def _unwrap_optional(tp: Any) -> Tuple[Any, bool]:
    if typing.get_origin(tp) is Union and type(None) in typing.get_args(tp):
        rest = [a for a in typing.get_args(tp) if a is not type(None)]
        return rest[0], True
    return tp, False


@dataclass
class _OptionalSection:
    defaults: Dict[str, Any]


@dataclass
class Schema:
    """What a dataclass schema says: known keys (``a.*``: free below ``a``), rules, required keys
    and the defaults of absent keys (``None`` for an optional section)."""

    known: List[str]
    rules: List[Rule]
    required: List[str]
    defaults: Dict[str, Any]


def read_schema(cls: type, prefix: str = "") -> Schema:
    hints = typing.get_type_hints(cls)
    out = Schema([], [], [], {})
    for f in fields(cls):
        key, (tp, optional) = prefix + f.name, _unwrap_optional(hints[f.name])
        has_default = f.default is not MISSING or f.default_factory is not MISSING
        default = f.default if f.default is not MISSING else (f.default_factory() if has_default else None)
        if not has_default:
            out.required.append(key)
        if is_dataclass(tp):
            inner = read_schema(tp, key + ".")
            # a component with typed arguments: any other argument is the component's to check
            out.known += [key + ".*"] if "_component_" in inner.defaults else inner.known
            out.rules += inner.rules
            if default is not None or not optional:
                out.required += inner.required
                out.defaults[f.name] = inner.defaults
            else:  # off unless given; given, its absent keys take their defaults
                out.defaults[f.name] = _OptionalSection(inner.defaults)
            if optional:
                out.known.append(key)
            continue
        if has_default:
            out.defaults[f.name] = default
        if typing.get_origin(tp) is dict or tp is Component:
            out.known.append(key + ".*")
            out.known.append(key)
            continue
        out.known.append(key)
        if tp in (int, float, str, bool):
            m = f.metadata
            out.rules.append(Rule(key, tp, m.get("low"), m.get("high"), m.get("low_open", False),
                                  optional=optional, choices=m.get("choices", ())))
    return out


def with_defaults(cfg: DictConfig, schema: Schema) -> DictConfig:
    """``cfg`` with every absent key set to its schema default (a component node named with
    another ``_component_`` keeps only its own arguments)."""

    def prune(defaults: Dict[str, Any], user: Any) -> Dict[str, Any]:
        out = {}
        for key, value in defaults.items():
            mine = user.get(key) if isinstance(user, dict) else None
            if isinstance(value, _OptionalSection):
                out[key] = prune(value.defaults, mine) if isinstance(mine, dict) else None
            elif isinstance(value, dict) and isinstance(mine, dict):
                if "_component_" in value and mine.get("_component_", value["_component_"]) != value["_component_"]:
                    continue
                out[key] = prune(value, mine)
            elif isinstance(value, dict) and key in (user or {}) and mine is None:
                continue  # a section switched off with null stays off
            else:
                out[key] = value
        return out

    raw = OmegaConf.to_container(cfg, resolve=False)
    return OmegaConf.merge(OmegaConf.create(prune(schema.defaults, raw)), cfg)


def check_schema(cfg: DictConfig, schema: Schema, torchtune_keys: Iterable[str] = ()) -> DictConfig:
    """Refuse unknown keys (with a did-you-mean), missing required ones and values out of range;
    return ``cfg`` completed with the defaults. Nothing is loaded."""
    check_known_keys(cfg, schema.known, torchtune_keys, hints=[r.key for r in schema.rules])
    for key in schema.required:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value is None or value == "???":
            raise ValueError(f"config {key}: required; set it in the config or as an override {key}=...")
    full = with_defaults(cfg, schema)
    check_component_args(full)
    check_settings(full, schema.rules)
    return full


def check_component_args(cfg: DictConfig) -> None:
    """Every ``_component_`` node names an importable callable that takes each of its arguments
    (``optimizer.lrr=1e-3`` fails here, with a did-you-mean, not when the optimizer is built)."""
    from torchtune.config._utils import _get_component_from_path

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            if "_component_" in node:
                check(node, prefix)
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{prefix[:-1]}[{i}].")

    def check(node: Dict[str, Any], prefix: str) -> None:
        path = node["_component_"]
        try:
            target = _get_component_from_path(str(path))
        except Exception as e:  # import errors of any kind, with the key that named the path
            raise ValueError(f"config {prefix}_component_: cannot import {path!r}: {e}") from None
        try:
            params = inspect.signature(target).parameters
        except (TypeError, ValueError):  # a builtin without a signature: checked when it is called
            return
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return
        for arg in node:
            if arg != "_component_" and arg not in params:
                close = difflib.get_close_matches(arg, list(params), n=1, cutoff=0.6)
                hint = f"; did you mean {prefix}{close[0]}?" if close else ""
                raise ValueError(f"config {prefix}{arg}: {path} takes no argument {arg!r}{hint} "
                                 f"(it takes: {', '.join(params)})")

    walk(OmegaConf.to_container(cfg, resolve=False), "")
