"""Write files and folders under a temporary name, then rename: a crash never leaves half a file."""
from __future__ import annotations

import contextlib
import errno
import glob
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lsmfm.errors import InputError
from lsmfm.io.lock import PARTIAL_MARKER, is_lsmfm_partial, mark_partial, output_lock


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to `path` atomically."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write bytes to `path` atomically (same-directory temp file, fsync, rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def _umask() -> int:
    """The process umask (mkstemp/mkdtemp create 0600 files and 0700 folders; what is renamed into
    place should get the usual mode)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share_per_umask(path: str | Path) -> None:
    """Give a file the mode the umask allows (0644 under umask 022): for writers that create their
    files 0600 (safetensors, mkstemp), so colleagues on a shared cluster can read what is shared."""
    os.chmod(path, 0o666 & ~_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; rename it over `path` only if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; it becomes `path` only if the block succeeds. The
    output's lock (`lsmfm.io.lock`) is held throughout, so a second writer of `path` is refused."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists")
    with output_lock(target):
        if target.exists() and not overwrite:  # finished by another writer while we started
            raise FileExistsError(f"{target}: already exists")
        for old in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
            if old.is_dir() and is_lsmfm_partial(old):  # left by a killed writer of this output
                shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        try:
            mark_partial(tmp)
            yield tmp
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: others could not read what we share
            commit_partial(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def commit_partial(partial: str | Path, out: str | Path) -> None:
    """Rename a finished, lsmfm-marked `partial` folder to `out` (an old `out` is removed only now) and
    drop the marker."""
    replace_dir(partial, out)
    (Path(out) / PARTIAL_MARKER).unlink(missing_ok=True)


def replace_dir(src: str | Path, target: str | Path) -> None:
    """Move the finished folder `src` to `target`, removing an old `target` only once `src` is complete."""
    src, target = Path(src), Path(target)
    if not target.exists():
        os.replace(src, target)
        return
    old = target.with_name(f".{target.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(target, old)
    os.replace(src, target)
    shutil.rmtree(old, ignore_errors=True)


def disk_error(exc: BaseException, target: str | Path) -> InputError | None:
    """The one-line error for a write to `target` that the disk refused (full, over quota, read-only),
    naming the output rather than whatever was being read; None for any other failure."""
    if not isinstance(exc, OSError) or exc.errno not in _DISK_ERRNOS:
        return None
    return InputError(target, f"cannot write: {os.strerror(exc.errno)} ({free_gib(target):.1f} GiB free on "
                              "its device); free some space or choose another output")


def cut_short_error(exc: BaseException, target: str | Path | None) -> InputError | None:
    """The one-line error for a write that a library reports without an errno (torch.save's "unexpected
    pos", numpy's "N requested and M written"): on a full disk or over quota, these are all it says."""
    chain = [exc]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)  # type: ignore[arg-type]
    if not any(re.search(CUT_SHORT, str(e)) for e in chain):
        return None
    free = f"; {free_gib(target):.1f} GiB free on its device" if target is not None else ""
    return InputError(target, f"cannot write: a write was cut short (a full disk, a quota or a file-size "
                              f"limit{free}); free some space or choose another output")


def free_gib(target: str | Path) -> float:
    """Free space, in GiB, on the device of `target` (or of its nearest existing parent)."""
    target = Path(target).absolute()
    folder = next((p for p in [target, *target.parents] if p.exists()), Path("."))
    return shutil.disk_usage(folder).free / 2**30


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS}
# How writers without an errno report a short write: torch.save (PytorchStreamWriter), numpy.tofile.
CUT_SHORT = r"unexpected pos \d+ vs \d+|basic_ios::clear: iostream error|file write failed|" \
            r"\d+ requested and \d+ written"
