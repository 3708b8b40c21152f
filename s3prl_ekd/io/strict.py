"""Typed dataclasses from YAML: unknown keys, missing keys and wrong types fail at load,
naming the key and, for a typo, the key that was probably meant."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from s3prl_ekd.errors import ConfigError


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, where: str):
    """Check `value` against the annotation `tp`, building nested dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_convert(item, item_tp, f"{where}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _yaml11_text_float(value):
        raise ConfigError(f"{where}: {value!r} is text, not a number: YAML 1.1 reads a number without a dot in its "
                          f"mantissa as text; write {_with_dot(value)}")
    if tp in (int, float) and isinstance(value, bool) or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _yaml11_text_float(text: str) -> bool:
    """A number YAML 1.1 reads as text: an exponent without a dot in the mantissa (5e-2)."""
    try:
        float(text)
    except ValueError:
        return False
    return "e" in text.lower() and "." not in text.lower().partition("e")[0]


def _with_dot(text: str) -> str:
    """'5e-2' -> '5.0e-2', as YAML 1.1 reads it as a float."""
    mantissa, sep, exponent = text.lower().partition("e")
    return (mantissa if "." in mantissa else mantissa + ".0") + sep + exponent


def from_dict(cls, data: Any, where: str = "config"):
    """Build dataclass `cls` from a plain dict; unknown or missing keys are errors."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            raise ConfigError(f"{where}.{key}: unknown key; {hint}")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{where}.{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}.{name}: required key is missing")
    return cls(**kwargs)


def _strict_loader():
    """yaml.SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one silently)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return StrictLoader


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """The mapping in YAML file `path` (empty file: {}); `what` names the file in errors. A key given
    twice in one mapping is an error naming both lines."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found" + ("; it is a folder" if path.is_dir() else ""))
    try:
        data = yaml.load(path.read_text(), Loader=_strict_loader())
    except yaml.constructor.ConstructorError as error:
        parent = _parent_key(path, error.problem_mark.line) if error.problem_mark else None
        raise ConfigError(f"{path}: {parent + ': ' if parent else ''}{error.problem}; keep one") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys in the {what}, got {type(data).__name__}")
    return data


def _parent_key(path: Path, line: int) -> str | None:
    """The key of the mapping that holds `line` (0-based), found by indentation: for error messages."""
    lines = path.read_text().splitlines()
    indent = len(lines[line]) - len(lines[line].lstrip())
    for previous in reversed(lines[:line]):
        stripped = previous.lstrip()
        if stripped and not stripped.startswith("#") and len(previous) - len(stripped) < indent:
            return stripped.split(":")[0].strip()
    return None
