"""Registries by name: "module:attr" entries imported when first used, so listing or reading configs
imports none of them (the task and backbone registries are `Registry`s; see `lsmfm/tasks/registry.py`)."""
from __future__ import annotations

import importlib
from typing import Any, Mapping

from lsmfm.errors import ConfigError


class Registry(dict):
    """name -> "package.module:attr". A dict, so it lists, tests and patches like one."""

    def __init__(self, kind: str, entries: Mapping[str, str]) -> None:
        super().__init__(entries)
        self.kind = kind

    def register(self, name: str, target: str, replace: bool = False) -> None:
        """Add `name` -> `target` ("module:attr"); an existing name needs `replace=True`."""
        if name in self and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered ({self[name]})")
        if target.count(":") != 1:
            raise ValueError(f"{self.kind} {name!r}: target must be 'module:attr', got {target!r}")
        self[name] = target

    def load(self, name: str) -> Any:
        """The object registered as `name`; an unknown name is a ConfigError listing the known ones."""
        if name not in self:
            raise ConfigError(f"unknown {self.kind} {name!r}; expected one of {', '.join(self)}")
        module, _, attr = self[name].partition(":")
        return getattr(importlib.import_module(module), attr)
