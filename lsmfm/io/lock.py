"""One writer per output: an exclusive lock file next to the output, held for the whole run.

    with output_lock(out, "lsmfm predict"):
        ...  # write <out>.partial, rename it to <out>

The lock is `<out>.lock`, a small JSON record of its holder (host, pid, command, start time) kept under
an `flock` for the run. A second writer is refused at once with an `OutputLocked` error that names the
holder. The kernel drops an `flock` when its process dies, so the lock of a killed run (kill -9, node
reboot on a file system with cluster-wide flock) is taken over by the next writer, with a warning that
names the dead holder. Where a file system refuses `flock` (some NFS mounts), the record alone decides:
a holder on this host whose process is gone is stale; one on another host is refused, with how to
remove the lock by hand.

`partial_dir` and `remove_partial` mark and clean lsmfm's own `<out>.partial` folders: a folder of that
name without lsmfm's marker was not written by lsmfm and is never deleted (`lsmfm.io.atomic.
commit_partial` renames a finished one into place).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from lsmfm.errors import InputError, LsmfmWarning

PARTIAL_MARKER = ".lsmfm-partial"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class OutputLocked(InputError):
    """Another writer holds the output's lock; `holder` is its record (host, pid, command, started)."""

    def __init__(self, out: Path, holder: dict[str, Any], hint: str = "") -> None:
        self.holder = holder
        who = describe(holder)
        super().__init__(out, f"in use by {who}; wait for it to finish or choose another output"
                         + (f" ({hint})" if hint else ""))


def lock_path(out: str | Path) -> Path:
    """The lock file of output `out`: `<out>.lock` in the same folder."""
    out = Path(out)
    return out.with_name(out.name + ".lock")


def describe(holder: dict[str, Any]) -> str:
    """'lsmfm predict (pid 123 on host, since 2026-01-01 12:00:00)'."""
    since = holder.get("started")
    when = time.strftime(", since %Y-%m-%d %H:%M:%S", time.localtime(since)) if since else ""
    return f"{holder.get('command') or 'another process'} (pid {holder.get('pid', '?')} on " \
           f"{holder.get('host', '?')}{when})"


def read_holder(out: str | Path) -> dict[str, Any] | None:
    """The record in `out`'s lock file, or None when there is no (readable) lock."""
    try:
        return _parse(lock_path(out).read_bytes())
    except OSError:
        return None


@contextlib.contextmanager
def output_lock(out: str | Path, command: str | None = None) -> Iterator[dict[str, Any]]:
    """Hold the exclusive lock of `out` for the block; yields this writer's record. `command` names
    the writer in a refusal (default: this process's command line, shortened)."""
    fd, record = acquire(out, command)
    try:
        yield record
    finally:
        release(out, fd)


def acquire(out: str | Path, command: str | None = None) -> tuple[int, dict[str, Any]]:
    """Take the lock of `out` (see module doc): (file descriptor to pass to `release`, record)."""
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(path.parent, f"cannot write the output folder: {_problem(exc)}") from exc
    while True:
        fd = _open(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            kernel = True
        except BlockingIOError:
            holder = _holder_of(fd)
            os.close(fd)
            raise OutputLocked(Path(out), holder) from None
        except OSError as exc:
            if exc.errno not in _NO_FLOCK:
                os.close(fd)
                raise
            kernel = False
        if not _same_file(fd, path):  # the previous holder removed the file as we opened it
            os.close(fd)
            continue
        previous = _read_fd(fd)
        if previous and not kernel and _may_be_alive(previous):
            os.close(fd)
            raise OutputLocked(Path(out), previous, f"if it is not running, remove {path}")
        if previous:
            warnings.warn(LsmfmWarning(f"{path}: took over the stale lock of {describe(previous)}, "
                                       "which is no longer running"))
        record = {"host": socket.gethostname(), "pid": os.getpid(), "command": command or _command(),
                  "started": time.time(), "argv": sys.argv, "start_ticks": _start_ticks(os.getpid())}
        _write_fd(fd, record)
        return fd, record


def release(out: str | Path, fd: int) -> None:
    """Remove the lock file, then drop the lock (a waiter that opened the old file retries)."""
    path = lock_path(out)
    try:
        if _same_file(fd, path):
            path.unlink()
    finally:
        os.close(fd)


def partial_dir(out: str | Path) -> Path:
    """A fresh, marked `<out>.partial` folder for a writer holding `out`'s lock (an old one of lsmfm's is
    removed first; a foreign folder of that name is refused)."""
    partial = remove_partial(out)
    partial.mkdir(parents=True)
    mark_partial(partial)
    return partial


def mark_partial(partial: str | Path) -> None:
    """Mark the folder `partial` as lsmfm's unfinished output, so a later run may remove it."""
    record = {"command": _command(), "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    (Path(partial) / PARTIAL_MARKER).write_text(json.dumps(record) + "\n")


def is_lsmfm_partial(partial: str | Path) -> bool:
    return (Path(partial) / PARTIAL_MARKER).is_file()


def remove_partial(out: str | Path) -> Path:
    """Delete `out`'s leftover `.partial` folder if lsmfm wrote it; returns its path. Call under the lock."""
    out = Path(out)
    partial = out.with_name(out.name + ".partial")
    if partial.is_symlink() or partial.is_file():
        raise InputError(partial, "is in the way of the output's temporary folder and was not written by "
                                  "lsmfm; move it away")
    if partial.exists():
        if not is_lsmfm_partial(partial):
            raise InputError(partial, "exists and was not written by lsmfm (no lsmfm marker); move it away "
                                      "or remove it yourself")
        shutil.rmtree(partial)
    return partial


def _command() -> str:
    """'lsmfm predict' for the CLI, else the program's name (python, pytest, ...)."""
    argv = sys.argv or ["python"]
    name = Path(argv[0]).name
    if name in ("lsmfm", "main.py", "__main__.py") and len(argv) > 1:
        return f"lsmfm {argv[1]}"
    return name


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise InputError(path, f"cannot write the output's lock file: {_problem(exc)}") from exc


def _problem(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_fd(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return _parse(b"".join(chunks))


def _holder_of(fd: int, wait: float = 1.0) -> dict[str, Any]:
    """The holder's record; it may be a moment from being written when the lock was just taken."""
    deadline = time.monotonic() + wait
    while (record := _read_fd(fd)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return record or {}


def _write_fd(fd: int, record: dict[str, Any]) -> None:
    data = (json.dumps(record) + "\n").encode()
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(data)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _start_ticks(pid: int) -> int | None:
    """A process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _may_be_alive(holder: dict[str, Any]) -> bool:
    """False only when the holder is known dead: same host, and its pid is gone or belongs to another
    process now. A holder on another host cannot be checked from here."""
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    ticks = holder.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)
