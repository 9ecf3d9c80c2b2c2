"""Optional dependencies: the one import helper that turns a missing one into a one-line error naming the
`pip install 'lsmfm[EXTRA]'` that brings it.

`pip install lsmfm` alone loads weights, finetunes, predicts and writes model folders; the extras (in
pyproject.toml) add: train (DeepSpeed for pretraining, TensorBoard logs), text (the transformers text
encoder), baselines (the 2D baselines: transformers, peft), bioimageio (bioimage.io packages), qlora
(bitsandbytes), cluster (dask.distributed, dask-jobqueue); all = every one but qlora. Every import
of one of these packages goes through `require`.

Example:
    >>> deepspeed = require("deepspeed", "train", "pretraining")
    # without DeepSpeed: MissingExtra("pretraining needs deepspeed, which is not installed:
    #                                   pip install 'lsmfm[train]'")
"""
from __future__ import annotations

import importlib
from types import ModuleType

from lsmfm.errors import LsmfmError

EXTRAS = ("train", "text", "baselines", "bioimageio", "qlora", "cluster", "all")


class MissingExtra(LsmfmError, ImportError):
    """An optional dependency is not installed; the message names the extra that installs it."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module`, or raise MissingExtra: "PURPOSE needs MODULE, which is not installed:
    pip install 'lsmfm[EXTRA]'". An installed package whose own imports fail raises as it is."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; lsmfm's extras: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or ""
        if missing and not (module == missing or module.startswith(missing + ".")):
            raise
        raise MissingExtra(f"{purpose} needs {module.split('.')[0]}, which is not installed: "
                           f"pip install 'lsmfm[{extra}]'") from exc
