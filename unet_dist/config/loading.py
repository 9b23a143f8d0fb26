"""Reading the configuration: YAML mappings, dotted overrides and checkpoint dicts onto the
sections of config/sections.py, every key and type checked as it is read."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from typing import Any, Literal

import yaml

from unet_dist.errors import UserError


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) if isinstance(a, str) else str(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return f"list of {'mappings of ' if dataclasses.is_dataclass(item) else ''}{item.__name__}"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str, strict: bool = False) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected.
    `strict`: a value set in code, not read from text, so no string stands for a number or back."""

    def bad() -> UserError:
        return UserError(f"{source}: {key}: expected {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise bad()
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise bad()
        if dataclasses.is_dataclass(item_tp):
            return [_section(item_tp, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return [_coerce(v, item_tp, f"{key}[{i}]", source, strict) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported annotation for {key}")  # keep the schema simple
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, str) and not strict:  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        return float(value)
    if tp is str:
        if isinstance(value, int) and not isinstance(value, bool) and not strict:
            value = str(value)  # YAML reads `data.raw_array=1` (a pyramid level) as a number
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _section(tp: type, value: Any, key: str, source: str) -> Any:
    """A list item that is itself a section (data.volumes[i]): its defaults, then `value`'s keys."""
    if not isinstance(value, dict):
        raise UserError(f"{source}: {key}: expected a mapping of {tp.__name__} keys, got {value!r}")
    item = tp()
    merge(item, value, f"{key}.", source)
    return item


def _unknown_key(key: str, known: list[str], source: str) -> UserError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"
    return UserError(f"{source}: unknown key '{key}'{hint}")


def merge(obj: Any, updates: dict, prefix: str, source: str) -> None:
    """Apply a nested dict of updates onto dataclass `obj`, validating every key and type."""
    hints = _hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in hints:
            raise _unknown_key(key, names, source)
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise UserError(f"{source}: {key}: expected a mapping of {tp.__name__} keys, got {value!r}")
            merge(getattr(obj, name), value, f"{key}.", source)
        else:
            setattr(obj, name, _coerce(value, tp, key, source))


def parse_override(text: str) -> tuple[str, Any]:
    """`train.lr=3e-4` -> ("train.lr", 0.0003); the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{text}': expected KEY=VALUE, e.g. train.lr=3e-4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def nest(key: str, value: Any) -> dict:
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return nested


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)

def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


@functools.cache
def _hints(section_type: type) -> dict[str, Any]:
    return typing.get_type_hints(section_type)


def check_types(section: Any, prefix: str, source: str) -> None:
    """Every key of a flat section (model, data.augment) holds a value of its type: for sections
    built in code, which did not pass through `merge` as the YAML and checkpoint ones did."""
    for name, tp in _hints(type(section)).items():
        _coerce(getattr(section, name), tp, f"{prefix}{name}", source, strict=True)
