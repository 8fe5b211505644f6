"""Recipes: TOML files validated into dataclasses, with `--set section.key=value` overrides on top.

Precedence is CLI > TOML > dataclass defaults. Every key must name a field and every value must have the
field's type; anything else is a `UserError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from tinylm.errors import UserError


class RecipeSource(str):
    """Where a recipe's values come from: the file (the string itself) and the `--set` flags that replaced keys,
    so that an error names the flag when a flag set the value."""

    def __new__(cls, path: str, overrides: dict[str, str] | None = None):
        obj = super().__new__(cls, path)
        obj.overrides = dict(overrides or {})
        return obj


def blame(where: str, key: str) -> str:
    """`--set KEY=...` when that flag set `key` (or a table above or below it), else `where`."""
    for set_key, text in getattr(where, "overrides", {}).items():
        if key == set_key or key.startswith(set_key + ".") or set_key.startswith(key + "."):
            return f"--set {text}"
    return str(where)


class SettingError(ValueError):
    """A value outside its range, raised by a section's `__post_init__`; `key` names the field."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key} {message}")
        self.key, self.message = key, message


def check(obj, names: str, test, expected: str) -> None:
    """A `SettingError` for the first of the space-separated fields `names` whose value (when set) fails `test`."""
    for name in names.split():
        value = getattr(obj, name)
        if value is not None and not test(value):
            raise SettingError(name, f"must be {expected}, got {value!r}")


def at_least(obj, minimum, names: str) -> None:
    check(obj, names, lambda v: v >= minimum, f"at least {minimum}")


def positive(obj, names: str) -> None:
    check(obj, names, lambda v: v > 0, "positive")


def fraction(obj, names: str, below_one: bool = False) -> None:
    """Values in [0, 1], or [0, 1) when `below_one`."""
    check(obj, names, (lambda v: 0 <= v < 1) if below_one else (lambda v: 0 <= v <= 1),
          "in [0, 1)" if below_one else "in [0, 1]")


def one_of(obj, name: str, choices) -> None:
    check(obj, name, lambda v: v in choices, "one of " + ", ".join(map(str, choices)))


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp, value, key: str, where: str):
    """Check `value` against the annotation `tp` and return it in that type (int -> float allowed)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{blame(where, key)}: {key} must not be empty")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"{blame(where, key)}: {key} must be a table, got {type(value).__name__}")
        return from_dict(tp, value, where, prefix=key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{blame(where, key)}: {key} must be a list, got {type(value).__name__}")
        item = args[0] if args else Any
        items = [_convert(item, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{blame(where, key)}: {key} must be a table, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, f"{key}.{k}", where) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, float) and math.isfinite(value) or isinstance(value, int) and abs(value) < 2**63:
                return float(value)
            raise UserError(f"{blame(where, key)}: {key} must be a finite number, got {value!r}")
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) < 2**63:
                return value
            raise UserError(f"{blame(where, key)}: {key} is out of range, got {value!r}")
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise UserError(f"{blame(where, key)}: {key} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def from_dict(cls, data: dict, where: str, prefix: str = ""):
    """Build dataclass `cls` from a plain dict, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            full = f"{prefix}.{k}" if prefix else k
            raise UserError(f"{blame(where, full)}: unknown key {full!r} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            full = f"{prefix}.{f.name}" if prefix else f.name
            kwargs[f.name] = _convert(hints[f.name], data[f.name], full, where)
    try:
        obj = cls(**kwargs)
    except SettingError as e:
        full = f"{prefix}.{e.key}" if prefix else e.key
        raise UserError(f"{blame(where, full)}: {full} {e.message}") from None
    except (TypeError, ValueError) as e:
        raise UserError(f"{where}: {prefix or cls.__name__}: {e}") from None
    return obj


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` (`stages.NAME.section.key=value` for one stage) with the value read as TOML (so 3, 1e-3, true, "x", [1, 2] work); bare words are strings."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise UserError(f"--set {text!r}: empty key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def _list_entry(items: list, part: str, text: str):
    """The table of a list of tables (`[[data.sources]]`) that a `--set` path names: by its `name`, or by index."""
    for item in items:
        if isinstance(item, dict) and item.get("name") == part:
            return item
    if part.isdigit() and int(part) < len(items) and isinstance(items[int(part)], dict):
        return items[int(part)]
    names = [str(i.get("name")) for i in items if isinstance(i, dict) and "name" in i]
    raise UserError(f"--set {text!r}: no entry named {part!r} in the list (names: {', '.join(names) or 'none'}; "
                    f"or an index below {len(items)})")


def apply_overrides(data: dict, overrides: list[str]) -> dict[str, str]:
    """Apply each override to `data` in place; returns {dotted key: the flag's text} for error messages.

    A list of tables is entered by an entry's name or index, so one source's file or one stage's setting can
    change with `--set data.sources.NAME.path=...` or `--set stages.NAME.optim.lr=...`."""
    applied = {}
    for text in overrides:
        path, value = parse_override(text)
        applied[".".join(path)] = text
        node = data
        for part in path[:-1]:
            if isinstance(node, list):
                node = _list_entry(node, part, text)
                continue
            child = node.setdefault(part, {})
            if not isinstance(child, (dict, list)):
                raise UserError(f"--set {text!r}: {part!r} is not a section")
            node = child
        if isinstance(node, list):
            raise UserError(f"--set {text!r}: {path[-2] if len(path) > 1 else path[-1]!r} is a list; name an "
                            f"entry and its key (section.list.NAME.key=value) or give the whole list")
        node[path[-1]] = value
    return applied


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file (not UTF-8)") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None


def load(cls, path: str | Path, overrides: list[str] | None = None):
    """Read a recipe file into `cls`, applying `--set` overrides first."""
    data = read_toml(path)
    applied = apply_overrides(data, list(overrides or []))
    return from_dict(cls, data, RecipeSource(str(path), applied))


def dumps(obj) -> str:
    return json.dumps(to_dict(obj), indent=2, sort_keys=True)
