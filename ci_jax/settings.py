"""Typed settings sections: each field carries its meaning, choices and range, and that one source
gives validation, config files, command-line flags and `--help`.

A section is a frozen dataclass whose fields are made with `setting(...)`; a field whose type is
itself a section is a subsection, so a config is a tree and every leaf has a dotted path
(`defense.ci.tau`): the key in config files and sweep specs, and the flag (`--defense.ci.tau`).
Leaf types: int, float, bool, str, and tuple[str, ...] (a list of names).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import reprlib
import typing
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from ci_jax.errors import UserError, one_line, unknown_name

# Seeds, counts and sizes end up in int32 arrays and in numpy/sklearn seeds (< 2^32): an int beyond
# this is a typo, and rejecting it here beats an OverflowError deep inside a library.
INT_MAX = 2**31 - 1
_TYPE_WORDS = {int: "an int (a whole number)", float: "a number", bool: "true or false",
               str: "a string", tuple: "a list of names"}


def setting(default: Any, help: str, *, choices: Sequence[str] | None = None,
            low: float | None = None, high: float | None = None, low_open: bool = False) -> Any:
    """A section field: its default, a one-line meaning, and for names their choices (every entry
    of a list must be one; a registry's live `Names` keeps up with later registrations), for numbers their range [low, high] ((low, high] with low_open)."""
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": choices, "low": low, "high": high, "low_open": low_open})


def section(cls: type) -> type:
    """A frozen dataclass of settings."""
    return dataclasses.dataclass(frozen=True)(cls)


def is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def hints(cls: type) -> dict[str, Any]:
    """Field name -> resolved type (annotations are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(cls)


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: str
    kind: type  # int, float, bool, str or tuple
    field: dataclasses.Field

    @property
    def meta(self) -> Mapping[str, Any]:
        return self.field.metadata

    @property
    def default(self) -> Any:
        return self.field.default


def leaves(cls: type, prefix: str = "") -> Iterator[Leaf]:
    """Every leaf of a section class, depth first, in field order."""
    for f in dataclasses.fields(cls):
        tp = hints(cls)[f.name]
        path = f"{prefix}{f.name}"
        if is_section(tp):
            yield from leaves(tp, path + ".")
        else:
            yield Leaf(path, typing.get_origin(tp) or tp, f)


@functools.cache
def leaf_map(cls: type) -> dict[str, Leaf]:
    return {leaf.path: leaf for leaf in leaves(cls)}


def get(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# -- values -------------------------------------------------------------------------------------
class _Repr(reprlib.Repr):
    """Bounded repr: a config file may hold a million-digit int, a huge string or a deep list."""

    def __init__(self) -> None:
        super().__init__()
        self.maxstring, self.maxother, self.maxlong, self.maxlevel = 60, 60, 40, 3

    def repr_int(self, x: int, level: int) -> str:
        if x.bit_length() > 10_000:  # str() refuses ints beyond 4300 digits
            return f"<int of {x.bit_length()} bits>"
        return super().repr_int(x, level)


show = _Repr().repr


def range_text(meta: Mapping[str, Any]) -> str | None:
    low, high, low_open = meta["low"], meta["high"], meta["low_open"]
    if low is None and high is None:
        return None
    if high is None:
        return f"{'>' if low_open else '>='} {low}"
    if low is None:
        return f"<= {high}"
    return f"{'>' if low_open else 'from'} {low} {'and <=' if low_open else 'to'} {high}"


def check_value(leaf: Leaf, v: Any) -> Any:
    """The value, normalised (an int in a float field becomes a float, a list a tuple); UserError
    naming the field for a wrong type, a non-finite or out-of-range number, or an unknown name."""
    kind, meta, where = leaf.kind, leaf.meta, f"config field {leaf.path} = {show(v)}"
    if kind is tuple:
        if isinstance(v, str) or not isinstance(v, (list, tuple)) or not v \
                or not all(isinstance(x, str) for x in v):
            raise UserError(f"{where}: expected a non-empty list of names")
        for x in v:
            if meta["choices"] is not None and x not in meta["choices"]:
                raise unknown_name(f"{leaf.path} entry", x, meta["choices"])
        if len(set(v)) != len(v):
            raise UserError(f"{where}: a name is listed twice")
        return tuple(v)
    want = {int: int, float: (int, float), bool: bool, str: str}[kind]
    # bool is an int subclass, so True would pass as 1 for an int or float field.
    if isinstance(v, bool) and kind is not bool or not isinstance(v, want):
        raise UserError(f"{where}: expected {_TYPE_WORDS[kind]}, got {type(v).__name__}")
    if kind is str:
        if meta["choices"] is not None and v not in meta["choices"]:
            raise unknown_name(leaf.path, v, meta["choices"])
        return v
    if kind is bool:
        return v
    if kind is float:
        try:
            v = float(v)
        except OverflowError:  # an int too large for a float
            v = math.inf
        if not math.isfinite(v):
            raise UserError(f"{where}: expected a finite number")
    low = meta["low"] if meta["low"] is not None else (-INT_MAX - 1 if kind is int else -math.inf)
    high = meta["high"] if meta["high"] is not None else (INT_MAX if kind is int else math.inf)
    if v < low or (meta["low_open"] and v == low) or v > high:
        # Past an int field's implicit int32 bound, state that bound ("must be >= 0" would not fit).
        stated = range_text(meta) if v <= high or meta["high"] is not None else None
        text = stated or f"from {low} to {high}"
        raise UserError(f"{where}: must be {text}")
    return v


def validate(obj: Any, prefix: str = "") -> None:
    """Checks every leaf of a section instance, then each section's own `check()` (cross-field
    rules), innermost first. `prefix`: the section's own dotted path, which messages name."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if is_section(hints(type(obj))[f.name]):
            validate(value, f"{prefix}{f.name}.")
    for leaf in leaves(type(obj)):
        if "." not in leaf.path:
            check_value(dataclasses.replace(leaf, path=prefix + leaf.path), getattr(obj, leaf.path))
    check = getattr(obj, "check", None)
    if check is not None:
        check()


def to_dict(obj: Any) -> dict[str, Any]:
    """Nested plain dict (lists for tuples): JSON-ready."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = to_dict(v) if dataclasses.is_dataclass(v) else list(v) if isinstance(v, tuple) else v
    return out


def flatten(cls: type, d: Mapping[str, Any], where: str) -> dict[str, Any]:
    """{dotted path: value} from a mapping that nests sections (`{defense: {ci: {tau: 1}}}`),
    names dotted paths (`{defense.ci.tau: 1}`), or mixes both. UserError for a key that is not a
    field (with the nearest valid one), a non-string key, or a field given twice."""
    if not isinstance(d, Mapping):
        raise UserError(f"{where}: expected a mapping of config fields, got {type(d).__name__}")
    paths = leaf_map(cls)
    sections = {p[:i] for p in paths for i, ch in enumerate(p) if ch == "."}
    out: dict[str, Any] = {}

    def walk(m: Mapping[str, Any], prefix: str) -> None:
        for k, v in m.items():
            if not isinstance(k, str):
                raise UserError(f"{where}: key {show(k)} is not a config field name")
            path = prefix + k
            if path in sections and isinstance(v, Mapping):
                walk(v, path + ".")
            elif path in paths:
                if path in out:
                    raise UserError(f"{where}: config field {path} is given twice")
                out[path] = v
            elif path in sections:
                raise UserError(f"{where}: {path} is a section: give a mapping of its fields")
            else:
                raise unknown_name(f"config field in {where}:", path, _nearest_first(path, paths))
    walk(d, "")
    return out


def _nearest_first(path: str, paths: Mapping[str, Leaf]) -> list[str]:
    """Valid paths to offer: those of the same section first, at most 12 of them listed."""
    head = path.rsplit(".", 1)[0] if "." in path else ""
    same = [p for p in paths if p.startswith(head + ".")] if head else [p for p in paths if "." not in p]
    import difflib

    close = difflib.get_close_matches(path, list(paths), n=3, cutoff=0.5)
    listed = list(dict.fromkeys(close + same + list(paths)))
    return listed[:12] + (["..."] if len(listed) > 12 else [])


def replace(obj: Any, flat: Mapping[str, Any], prefix: str = "") -> Any:
    """A copy of a section instance with the dotted paths in `flat` set (values normalised and
    checked one by one; cross-field checks are `validate`'s). `prefix`: the section's own dotted
    path, which messages name."""
    paths = leaf_map(type(obj))
    by_head: dict[str, dict[str, Any]] = {}
    direct: dict[str, Any] = {}
    for path, v in flat.items():
        if path not in paths:
            raise unknown_name("config field", path, _nearest_first(path, paths))
        head, _, rest = path.partition(".")
        if rest:
            by_head.setdefault(head, {})[rest] = v
        else:
            direct[head] = check_value(dataclasses.replace(paths[path], path=prefix + path), v)
    for head, sub in by_head.items():
        direct[head] = replace(getattr(obj, head), sub, f"{prefix}{head}.")
    return dataclasses.replace(obj, **direct)


def help_text(leaf: Leaf, presets: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """'meaning (choices: a, b; range; default: x)' for --help; with `presets` ({name: {dotted
    path: value}}), '(...; default: x (preset seed: y, fast: z))' naming each preset that sets
    the field to another value: the default alone would be wrong under those presets."""
    meta, parts = leaf.meta, []
    if meta["choices"] is not None:
        parts.append(f"choices: {', '.join(meta['choices'])}")
    if (r := range_text(meta)) is not None:
        parts.append(r)
    default = f"default: {_shown(leaf.default)}"
    differ = [f"{name}: {_shown(p[leaf.path])}" for name, p in sorted((presets or {}).items())
              if leaf.path in p and p[leaf.path] != leaf.default]
    parts.append(f"{default} (preset {', '.join(differ)})" if differ else default)
    return f"{meta['help']} ({'; '.join(parts)})"


def _shown(v: Any) -> str:
    """A value as it is written on the command line."""
    return " ".join(v) if isinstance(v, (tuple, list)) else str(v).lower() if isinstance(v, bool) else str(v)


def parse_flag_value(leaf: Leaf, text: str) -> Any:
    """A flag's text as the leaf's type; UserError naming the flag when it does not parse."""
    try:
        if leaf.kind is bool:
            if text.lower() not in ("true", "false"):
                raise ValueError
            return text.lower() == "true"
        return leaf.kind(text) if leaf.kind in (int, float) else text
    except ValueError:
        raise UserError(f"--{leaf.path} {one_line(text, 60)!r}: expected {_TYPE_WORDS[leaf.kind]}") from None
