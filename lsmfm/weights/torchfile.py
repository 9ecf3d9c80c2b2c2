"""Read PyTorch checkpoint files without ever running pickled code.

`torch.load(weights_only=True)` only rebuilds tensors and plain containers. A few more pure-data types
that Lightning checkpoints can carry (numpy scalars and arrays, paths) are allowed explicitly; any
other global (a class, a function such as `os.system`) makes the file refused, with the offending
names in the message.
"""
from __future__ import annotations

import pathlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lsmfm.errors import InputError


def _data_globals() -> list[Any]:
    """Pure-data types allowed on top of torch's weights-only set (numpy 1.x and 2.x spellings)."""
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [
        core._reconstruct, (core._reconstruct, "numpy.core.multiarray._reconstruct"),
        core.scalar, (core.scalar, "numpy.core.multiarray.scalar"),
        np.ndarray, np.dtype, *[getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")],
        pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath,
    ]


def load_torch_file(path: str | Path) -> Any:
    """Load a `.ckpt`/`.pt` file with weights_only; corrupt files and pickled code raise InputError."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "file not found")
    zipped = zipfile.is_zipfile(p)
    try:
        with torch.serialization.safe_globals(_data_globals()):
            return torch.load(p, map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        raise InputError(p, _refusal(p, exc)) from None
    except Exception as exc:  # torch raises RuntimeError, KeyError, EOFError... for damaged files
        raise InputError(p, f"not a readable PyTorch checkpoint (truncated or corrupt?): "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from None


def _refusal(path: Path, exc: Exception) -> str:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:
        names = []
    allowed = {getattr(g, "__module__", "") + "." + getattr(g, "__qualname__", "") for g in _data_globals()
               if not isinstance(g, tuple)}
    names = [n for n in names if n not in allowed]
    what = f"it references {', '.join(names)}" if names else f"{str(exc).splitlines()[-1]}"
    return (f"refused: the pickle carries code or objects beyond tensors and plain data ({what}); lsmfm "
            "loads checkpoints with torch.load(weights_only=True) and never executes pickled code")
