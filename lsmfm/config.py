"""Typed configs: dataclass defaults, merged with a YAML file, then dotted `key=value` overrides.

Every run saves the resolved config next to its outputs, so it can be reproduced from that file alone;
the saved file also records which lsmfm wrote it (top-level `provenance:`, ignored when it is loaded).
Unknown keys are errors that name the key and the file: a typo must never be silently ignored.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal, Sequence, TypeVar

import yaml

from lsmfm.errors import ConfigError
from lsmfm.io.atomic import atomic_write_text
from lsmfm.provenance import KEY as PROVENANCE_KEY, provenance

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from its defaults, the YAML file at `path` (optional) and `key=value` overrides."""
    data: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        data = read_yaml(path)
        data.pop(PROVENANCE_KEY, None)  # written by save_config: who made the file, not a setting
    for item in overrides:
        apply_override(data, item)
    return from_dict(cls, data, source=source)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {_yaml_problem(exc)}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict (a number indexes a list: `arms.0.source=...`); the value is
    parsed as YAML (so `3`, `true`, `[1, 2]` work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    node: Any = data
    for part in parts[:-1]:
        child = _item(node, part, item) if isinstance(node, list) else node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node = child
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {_yaml_problem(exc)}") from exc
    if isinstance(node, list):
        _item(node, parts[-1], item)
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def _item(items: list[Any], part: str, override: str) -> Any:
    """`arms.1.lr=...`: a list entry given in the file, by its index."""
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"override {override!r}: {part!r} is not an index of the {len(items)} list entries")
    return items[int(part)]


def _yaml_problem(exc: Exception) -> str:
    """PyYAML's multi-line message as one line: the problem and where (`line 2, column 1`)."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Recursively build dataclass `cls` from `data`, checking keys and types.

    A class with a `config_variant(data, where) -> (class, data)` classmethod is a tagged family: the
    hook picks the subclass the data describes (`BackboneConfig` by `arch`).
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    variant = getattr(cls, "config_variant", None)
    if variant is not None:  # a tagged family of configs (e.g. one class per backbone arch)
        cls, data = variant(data, f"{source}: {prefix.rstrip('.') or 'config'}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
            f"allowed: {', '.join(sorted(names))}"
        )
    kwargs = {k: _coerce(hints[k], v, source, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'}: {exc}") from exc


def _coerce(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, source, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args and args[0] is not Ellipsis else Any
        items = [_coerce(inner, v, source, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    return _coerce_scalar(tp, value, source, key)


def _coerce_scalar(tp: Any, value: Any, source: str, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    if tp is Path:
        return Path(value)
    return value


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass config (tuples and Paths made YAML-friendly)."""
    return _plain(dataclasses.asdict(cfg))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically, with the lsmfm version and commit that wrote it."""
    data = {**to_dict(cfg), PROVENANCE_KEY: provenance()}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
