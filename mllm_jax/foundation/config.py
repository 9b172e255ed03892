"""Typed run configs: dataclasses built from YAML plus dotted command-line overrides.

Every stage keeps its own config dataclass next to its code; this module only knows how
to build any tree of dataclasses from plain data, strictly: an unknown key, a value of
the wrong type or a failed validation raises :class:`ConfigError` naming the dotted key,
so a typo in a YAML file fails at load time instead of silently using a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mllm_jax.foundation.files import atomic_file

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the dotted key."""


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, where: str) -> Any:
    """Checks/coerces one value against a type annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own message says best what is wrong
            try:
                return _convert(options[0], value, where)
            except ConfigError as err:
                raise ConfigError(f"{err} (or null)") from None
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(option, value, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where=where)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            items = [
                _convert(a, v, _join(where, i))
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            ]
        else:
            item_tp = args[0] if args else Any
            items = [_convert(item_tp, v, _join(where, i)) for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, val_tp = args if args else (Any, Any)
        return {
            _convert(key_tp, k, _join(where, str(k))): _convert(val_tp, v, _join(where, str(k)))
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if tp is Path:
        if not isinstance(value, str | os.PathLike):
            raise ConfigError(f"{where}: expected a path, got {value!r}")
        return Path(value)
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: Mapping[str, Any], *, where: str = "") -> T:
    """Builds dataclass ``cls`` from nested plain data, strictly."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{_join(where, str(key))}: unknown key{hint}; known keys: {', '.join(fields)}"
        )
    kwargs = {name: _convert(hints[name], data[name], _join(where, name)) for name in data}
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{_join(where, missing[0])}: required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where or cls.__name__}: {exc}") from exc


def to_dict(config: Any) -> Any:
    """Inverse of :func:`from_dict`: plain, YAML-safe data."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, Mapping):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, list | tuple):
        return [to_dict(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parses ``"train.lr=1e-4"`` into (["train", "lr"], 1e-4); values are YAML scalars."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    try:
        value = _yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {exc}") from exc
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns a copy of nested ``data`` with each ``dotted.key=value`` set."""
    result = _deep_copy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = result
        for depth, part in enumerate(path):
            last = depth == len(path) - 1
            where = ".".join(path[: depth + 1])
            if isinstance(node, list):  # a list item by index: stages.0.steps
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise ConfigError(
                        f"override {text!r}: {where}: the list has {len(node)} items, "
                        f"{part!r} is not an index of it"
                    )
                part = int(part)
            elif not last:
                node.setdefault(part, {})
            if last:
                node[part] = value
            elif not isinstance(node[part], dict | list):
                raise ConfigError(f"override {text!r}: {where} is a value, not a section")
            else:
                node = node[part]
    return result


def _deep_copy(data: Any) -> Any:
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror or exc}") from exc
    try:
        data = _yaml_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()
) -> T:
    """Builds ``cls`` from an optional YAML file plus ``dotted.key=value`` overrides.

    An error names where the bad value came from: the file, or the overrides (``--set``).
    """
    data = load_yaml(path) if path is not None else {}
    return build_with_overrides(cls, data, overrides, path)


def build_with_overrides(
    cls: type[T], data: dict[str, Any], overrides: Sequence[str], path: str | os.PathLike | None
) -> T:
    """``cls`` from ``data`` (read from ``path``, if any) with ``overrides`` applied; a
    ``ConfigError`` says whether the file or the overrides hold the mistake."""
    if path is not None:
        try:
            from_dict(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from exc
    try:
        return from_dict(cls, apply_overrides(data, overrides))
    except ConfigError as exc:
        if not overrides:
            raise
        raise ConfigError(f"--set {' '.join(overrides)}: {exc}") from exc


def save_config(config: Any, path: str | os.PathLike) -> None:
    """Writes the config as YAML atomically (temp file in the same folder, then rename)."""
    with atomic_file(path) as handle:
        yaml.safe_dump(to_dict(config), handle, sort_keys=False)
