"""lsmfm: 3D foundation models for light-sheet fluorescence microscopy.

`import lsmfm` stays light: heavy modules (DeepSpeed, transformers) load only where they are used.
"""
from __future__ import annotations

from typing import Any

from lsmfm.provenance import VERSION as __version__

__all__ = ["load_pretrained", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "load_pretrained":
        from lsmfm.weights.load import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'lsmfm' has no attribute {name!r}")
