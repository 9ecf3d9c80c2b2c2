"""Read PyTorch checkpoint files without ever running pickled code: the one loader of every `.ckpt`/`.pt`.

`torch.load(weights_only=True)` rebuilds only tensors and plain containers. On top of that a vetted list of
pure-data types is allowed, each rebuilt from its own installed code and never from the file:

- numpy arrays, dtypes and scalars (RNG states in client states, metrics), numpy 1.x and 2.x spellings;
- paths;
- MONAI's `MetaTensor` and the enums of `monai.utils.enums` (`TraceKeys`, `MetaKeys`, `SpaceKeys`,
  `InterpolateMode`, ...): the LSM foundation model paper's Lightning callbacks hold metrics computed
  from MetaTensors that went through its load transforms;
- with `deepspeed=True` only, DeepSpeed's `ZeroStageEnum`, `LossScaler` and `fragment_address`, the
  data classes its ZeRO optimizer states pickle (found by listing
  `torch.serialization.get_unsafe_globals_in_checkpoint` of real ZeRO-0/1/2 checkpoints).

Any other global (a class outside the list, a function such as `os.system`) refuses the file, with the
offending names in the message. DeepSpeed reads its checkpoints itself, with `weights_only=False`; its
calls run inside `no_pickled_code()`, which makes every `torch.load` weights-only with this allowlist.
"""
from __future__ import annotations

import contextlib
import enum
import os
import pathlib
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from lsmfm.errors import InputError

FORCE_ENV = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_GLOBAL = re.compile(r"GLOBAL (\S+)")


class UnsafeCheckpointError(InputError):
    """The file's pickle references code or types outside the allowlist: refused, never unpickled.
    Distinct from damage, so callers never fall back from an attack to an older file."""


def _numpy_globals() -> list[Any]:
    core = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [
        core._reconstruct, (core._reconstruct, "numpy.core.multiarray._reconstruct"),
        core.scalar, (core.scalar, "numpy.core.multiarray.scalar"),
        np.ndarray, np.dtype, *[getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")],
    ]


def _monai_globals() -> list[Any]:
    import lsmfm._monai  # noqa: F401  (MONAI without transformers)
    from monai.data.meta_tensor import MetaTensor
    from monai.utils import enums

    members = (getattr(enums, n) for n in dir(enums))
    return [MetaTensor, *[m for m in members if isinstance(m, type) and issubclass(m, enum.Enum)
                          and m.__module__ == enums.__name__]]


def _deepspeed_globals() -> list[Any]:
    from lsmfm.extras import require

    require("deepspeed", "train", "reading DeepSpeed checkpoints")
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def data_globals(deepspeed: bool = False) -> list[Any]:
    """Pure-data types allowed on top of torch's weights-only set (see the module docstring)."""
    paths = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    return _numpy_globals() + paths + _monai_globals() + (_deepspeed_globals() if deepspeed else [])


def _allowed_names(globals_: Iterable[Any]) -> set[str]:
    return {g[1] if isinstance(g, tuple) else f"{g.__module__}.{g.__qualname__}" for g in globals_}


def load_torch_file(path: str | Path, map_location: Any = "cpu", deepspeed: bool = False) -> Any:
    """Load a `.ckpt`/`.pt` file weights-only; corrupt files and pickled code raise InputError."""
    p = Path(path)
    if not p.is_file():
        raise InputError(p, "file not found")
    allowed = data_globals(deepspeed)
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(p, map_location=map_location, weights_only=True, mmap=zipfile.is_zipfile(p))
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise load_failure(p, exc, allowed) from None


def load_failure(path: Path, exc: Exception, allowed: Iterable[Any]) -> InputError:
    """The error to raise: UnsafeCheckpointError naming the globals only when the file references any
    outside the allowlist; else an InputError saying it is damaged (random bytes are not "code")."""
    names = _GLOBAL.findall(str(exc)) if isinstance(exc, pickle.UnpicklingError) else []
    with contextlib.suppress(Exception):  # legacy or damaged files cannot be scanned
        names += torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    ok = _allowed_names(allowed)
    bad = sorted({python3_name(n.rstrip(".")) for n in names} - ok)
    if bad:
        return UnsafeCheckpointError(path, f"refused: the pickle references {', '.join(bad)}, code or "
                                           "objects beyond tensors and plain data; lsmfm loads "
                                           "checkpoints weights-only and never executes pickled code")
    lines = [line for line in str(exc).splitlines() if line.strip()]
    detail = lines[-1] if isinstance(exc, pickle.UnpicklingError) and lines else (lines[0] if lines else "")
    return InputError(path, f"not a readable PyTorch checkpoint (truncated, corrupt, or not written by "
                            f"torch.save): {type(exc).__name__}: {detail}")


def python3_name(name: str) -> str:
    """The global a pickle's `module.name` resolves to: torch.save writes protocol 2, whose Python 2
    spellings (`commands.Popen`, `__builtin__.eval`) Python 3 maps back on load (`subprocess.Popen`)."""
    import _compat_pickle

    module, _, attr = name.rpartition(".")
    if (module, attr) in _compat_pickle.NAME_MAPPING:
        module, attr = _compat_pickle.NAME_MAPPING[module, attr]
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{attr}"


@contextlib.contextmanager
def no_pickled_code(files: Iterable[Path], deepspeed: bool = True) -> Iterator[None]:
    """Every `torch.load` inside (DeepSpeed's own included) is weights-only with the allowlist.

    A refusal or a damaged file raises InputError naming the first of `files` that fails on its own.
    """
    allowed = data_globals(deepspeed)
    previous = os.environ.get(FORCE_ENV)
    os.environ[FORCE_ENV] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        for f in files:
            try:
                load_torch_file(f, deepspeed=deepspeed)
            except InputError as named:
                raise named from None
        raise
    finally:
        if previous is None:
            os.environ.pop(FORCE_ENV, None)
        else:
            os.environ[FORCE_ENV] = previous
