"""Typed config dataclasses: YAML in, validated objects out, and argparse flags from the same fields.

Every config is a plain `@dataclass` whose fields carry `metadata={"help": ...}` (see `field`).
`from_dict` validates a nested dict against it (unknown keys, wrong types, bad values) and
raises `PivotfuseError` naming the key and the file; `apply_overrides` implements
`--set a.b=value`; `add_arguments`/`from_args` turn a flat config into CLI flags with the
same help text, TRL/HfArgumentParser style.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from core.errors import PivotfuseError
from core.files import read_text

T = TypeVar("T")
MISSING = dataclasses.MISSING


def field(default: Any = MISSING, *, help: str, choices: tuple | None = None,
          default_factory: Any = MISSING) -> Any:
    """A dataclass field with help text (shown by `--help`) and optional allowed values."""
    meta = {"help": help, "choices": choices}
    if default_factory is not MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping, with a one-line error for a missing, non-UTF-8 or malformed file."""
    p = Path(path)
    text = read_text(p)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise PivotfuseError(f"{p}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PivotfuseError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else "a mapping" if dataclasses.is_dataclass(a) else _type_name(a)
                          for a in typing.get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str, src: str) -> Any:
    """Check/convert one value against a type annotation; raise naming `key` in `src`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]: X's own, more precise error
            return _convert(value, options[0], key, src)
        sections = [a for a in options if dataclasses.is_dataclass(a)]
        if isinstance(value, dict) and len(sections) == 1:  # a mapping means the section: its own errors
            return _convert(value, sections[0], key, src)
        for a in options:
            try:
                return _convert(value, a, key, src)
            except PivotfuseError:
                continue
        raise PivotfuseError(f"{src}: '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise PivotfuseError(f"{src}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise PivotfuseError(f"{src}: '{key}' expects a list, got {value!r}")
        inner = args[0] if args else Any
        return [_convert(v, inner, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise PivotfuseError(f"{src}: '{key}' expects a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(k, kt, key, src): _convert(v, vt, f"{key}.{k}", src) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise PivotfuseError(f"{src}: '{key}' expects a mapping, got {value!r}")
        return from_dict(tp, value, src=src, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise PivotfuseError(f"{src}: '{key}' expects true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise PivotfuseError(f"{src}: '{key}' expects an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PivotfuseError(f"{src}: '{key}' expects a number, got {value!r}")
        # NaN/inf pass every range check (`nan <= 0` is False) and then poison a whole model:
        # refused here, once, for every float field however it was given (YAML, --set, flags).
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float range
            number = math.inf
        if not math.isfinite(number):
            raise PivotfuseError(f"{src}: '{key}' expects a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise PivotfuseError(f"{src}: '{key}' expects a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, *, src: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, refusing unknown keys and wrong types.

    After construction the dataclass's own `validate()` (if any) runs; it (or a `__post_init__`
    check) raises `ValueError("field: reason")`, which is turned into a one-line error naming the file
    and the key: `FILE: 'prefix.field': reason`.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise PivotfuseError(f"{src}: unknown key '{prefix}{unknown[0]}' (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            value = _convert(data[name], hints[name], prefix + name, src)
            choices = f.metadata.get("choices")
            if choices and value not in choices and value is not None:
                raise PivotfuseError(f"{src}: '{prefix}{name}' must be one of {list(choices)}, got {value!r}")
            kwargs[name] = value
        elif f.default is MISSING and f.default_factory is MISSING:
            raise PivotfuseError(f"{src}: missing required key '{prefix}{name}'")
    try:
        obj = cls(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    except ValueError as e:
        raise PivotfuseError(f"{src}: {_validation_message(str(e), prefix)}") from None
    return obj


def _validation_message(text: str, prefix: str) -> str:
    """`field: reason` from a `validate()` → `'prefix.field': reason`, the key quoted whole."""
    name, sep, reason = text.partition(": ")
    if sep and name and " " not in name:
        return f"'{prefix}{name}': {reason}"
    # no leading field name: the reason is about the section itself
    return f"'{prefix[:-1]}': {text}" if prefix else text


def to_dict(obj: Any) -> Any:
    """Dataclass → plain dict (for writing the recipe next to every output)."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def apply_overrides(data: dict, overrides: list[str], src: str = "--set") -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides or []:
        if "=" not in item:
            raise PivotfuseError(f"{src}: expected key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise PivotfuseError(f"{src}: '{key}': no list item {part}")
                node = node[int(part)]
            else:
                node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise PivotfuseError(f"{src}: '{key}': '{part}' is not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise PivotfuseError(f"{src}: '{key}': no list item {last}")
            node[int(last)] = value
        else:
            node[last] = value
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None,
                section: str | None = None, args: argparse.Namespace | None = None) -> T:
    """The one loader of a config section, as every command reads its own: the top-level `section`
    of YAML file `path` (the whole file when None; nothing without a file), then the `--set`
    overrides (keys relative to what is loaded), then the flags of `args` that were given, validated
    once at the end. Errors name the file, else 'command line' (flags) or '--set', and the key."""
    data = load_yaml(path) if path else {}
    if section is not None:
        data = data.get(section) or {}
        if not isinstance(data, dict):
            raise PivotfuseError(f"{path or '--set'}: '{section}' must be a mapping")
    apply_overrides(data, overrides or [], "--set")
    src = str(path) if path else ("command line" if args is not None else "--set")
    return from_dict(cls, {**data, **given(cls, args)} if args is not None else data, src=src)


def _flag_type(tp: Any) -> tuple[Any, bool]:
    """(argparse type, is_list) for a field annotation; Optional[X] → X."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(inner[0]) if len(inner) == 1 else (str, False)
    if origin in (list, tuple):
        inner = typing.get_args(tp)
        return (inner[0] if inner else str), True
    return tp, False


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one `--flag` per field of flat dataclass `cls`, with the field's help text.

    Every flag defaults to `None` (= not given), so `from_args` can layer flags over a
    recipe file; the dataclass default is shown in the help.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp, is_list = _flag_type(hints[f.name])
        if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
            continue
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        kw: dict[str, Any] = {"dest": f.name, "default": None, "help": help_}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = tp if tp in (int, float, str) else str
            if is_list:
                kw["nargs"] = "+"
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            elif typing.get_origin(tp) is typing.Literal:
                kw["choices"] = typing.get_args(tp)
                kw["type"] = type(typing.get_args(tp)[0])
        parser.add_argument(flag, **kw)


def given(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of `cls` whose flags were given (an ungiven flag is None, see `add_arguments`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


def from_args(cls: type[T], args: argparse.Namespace, base: dict | None = None,
              src: str = "command line") -> T:
    """Build `cls` from a dict (e.g. a recipe section) overlaid with the flags that were given."""
    return from_dict(cls, {**(base or {}), **given(cls, args)}, src=src)
