"""What every `lsmfm` subcommand shares: the output options, up-front output checks, and the one error
handler that turns user errors into one line and exit code 1.

Exit codes: 0 success; 1 an error in the data, a file, a config or the environment (one line
`lsmfm CMD: error: PATH: problem`), and also a bug in lsmfm (then a traceback and a line saying where
to report it); 2 a usage error (argparse: unknown option, missing argument); 130 interrupted.

Example (a subcommand module):
    >>> def add_arguments(parser):
    ...     parser.add_argument("--out", type=Path, required=True)
    ...     add_overwrite(parser, "--out")
    ...     add_quiet(parser)
    >>> def run(args):
    ...     check_output(args.out, overwrite=args.overwrite, kind="folder")
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

from lsmfm.errors import InputError, LsmfmError, LsmfmNotice, LsmfmWarning
from lsmfm.io.atomic import cut_short_error

# OS errors caused by the environment or the user's paths, not by lsmfm: reported in one line.
USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST,
               errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.ELOOP, errno.EMFILE,
               errno.ENFILE, errno.EFBIG, errno.EIO, errno.ENOTEMPTY, errno.EXDEV, errno.ETXTBSY}
PROBLEM = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on device",
           errno.EDQUOT: "disk quota exceeded", errno.EEXIST: "already exists",
           errno.ENOENT: "no such file or folder", errno.ENOTDIR: "not a folder (a file is in the way)",
           errno.EISDIR: "is a folder, expected a file", errno.EIO: "input/output error (failing disk?)",
           errno.EFBIG: "file too large (a file-size limit, `ulimit -f`, or the file system's)"}
# Libraries that re-raise a failed write as text: Rust ones (safetensors) end it with `(os error 28)`,
# others (zarr, TensorBoard) keep only the message; the output is then what could not be written.
OS_ERROR_TEXT = re.compile(r"\(os error (\d+)\)")
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}
ERRNO_TEXT = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT}


def add_overwrite(parser: Any, what: str = "the output") -> None:
    """`--overwrite`: replace `what` when it exists (without it an existing output is refused)."""
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace {what} if it exists (default: refuse, nothing is touched)")


def add_quiet(parser: Any) -> None:
    """`--quiet`/`-q`: no progress output (errors and the final summary still print)."""
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="no progress bars or progress lines (errors and the summary still print)")


def add_protocol_arguments(parser: Any, *, config_example: str, out_help: str, what: str, resume_help: str,
                           overrides_example: str) -> None:
    """Arguments of a few-shot protocol command (finetune, compare): config, run folder, resume, overrides."""
    parser.add_argument("--config", type=Path, default=None, help=f"config YAML (e.g. {config_example})")
    parser.add_argument("--out", type=Path, required=True, help=out_help)
    add_overwrite(parser, what)
    parser.add_argument("--resume", action="store_true", help=resume_help)
    add_quiet(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help=f"dotted config overrides, e.g. {overrides_example}")


def report_protocol(title: str, out: Path, rows: list, runs: int, table: Callable[[list, Any], str],
                    metrics: Any, stopped: bool) -> int:
    """Print a protocol's table and plots; when a signal stopped it, say how to finish (exit status 75)."""
    from lsmfm.tasks.protocol import STOPPED

    if rows:
        print(f"\n{title} ({out}/results.csv)")
        print(table(rows, metrics))
        print(f"plots: {', '.join(str(out / f'{m}_vs_shots.png') for m in metrics)}")
    if stopped:
        print(f"stopped by a signal after {len(rows)} of {runs} runs; they are kept in "
              f"{out}: run the same command with --resume to finish")
        return STOPPED
    return 0


def check_output(path: str | Path | None, *, overwrite: bool | None,
                 kind: Literal["folder", "file", "store"] = "folder") -> Path | None:
    """Refuse, before any work, an output that cannot be written: an existing one without `overwrite`,
    a file where a folder goes (or the reverse), or a parent folder this process may not write.

    `overwrite=None` leaves what an existing output means to the command (e.g. ingest completes or
    refuses a store by what it holds). Returns the path (None passes through, for optional outputs)."""
    if path is None:
        return None
    out = Path(path)
    if out.exists() or out.is_symlink():
        if kind == "file" and out.is_dir():
            raise InputError(out, "is a folder; --out names the file to write")
        if kind != "file" and not out.is_dir():
            raise InputError(out, f"is an existing file, not a {kind}; choose another path")
        if overwrite is False and (kind == "file" or any(out.iterdir())):
            raise InputError(out, "already exists; choose another path or pass --overwrite")
    if out.is_dir():
        check_writable(out)  # written into; replacing it also needs its parent
    if not out.is_dir() or overwrite:
        check_writable(out.parent)
    return out


def check_writable(folder: str | Path) -> None:
    """The nearest existing ancestor of `folder` must be a folder this process may create entries in."""
    p = Path(folder).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise InputError(p, "is a file, so no folder can be created under it")
    if not os.access(p, os.W_OK | os.X_OK):
        problem = "read-only file system" if _read_only_fs(p) else "permission denied"
        raise InputError(p, f"cannot write here ({problem}); choose a path in a folder you can write")


def _read_only_fs(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def user_error_message(exc: BaseException, args: argparse.Namespace | None = None) -> str | None:
    """The one-line message for an error the user can fix, or None when `exc` is a bug in lsmfm."""
    if isinstance(exc, LsmfmError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory; use smaller blocks or batches (e.g. a smaller --block or --batch)"
    if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
        problem = PROBLEM.get(exc.errno, exc.strerror or str(exc)) if exc.errno else str(exc)
        where = exc.filename if exc.filename is not None else _output_of(args)
        if exc.filename2 is not None:
            where = f"{exc.filename} -> {exc.filename2}"
        return f"{where}: {problem}" if where is not None else problem
    where = _output_of(args)
    code = _errno_in_text(str(exc))
    if code is not None:
        problem = PROBLEM.get(code, os.strerror(code))
        return f"{where}: {problem}" if where is not None else problem
    cut_short = cut_short_error(exc, where)
    return str(cut_short) if cut_short is not None else None


def _errno_in_text(text: str) -> int | None:
    """The errno of a failed write that a library's message carries as text, or None."""
    found = OS_ERROR_TEXT.search(text)
    if found is not None and int(found.group(1)) in WRITE_ERRNOS:
        return int(found.group(1))
    return next((code for words, code in ERRNO_TEXT.items() if words in text), None)


def _output_of(args: argparse.Namespace | None) -> Any:
    return getattr(args, "out", None) if args is not None else None


def issues_url() -> str:
    """Where bugs are reported: the project's "Issues" URL in the package metadata."""
    from lsmfm.citation import project_url

    return project_url("Issues") or "the lsmfm issue tracker"


def run_command(command: str, run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace
                ) -> int:
    """Run a subcommand: user errors print one line (exit 1), bugs a traceback and where to report it;
    lsmfm's warnings print as one line each."""
    try:
        with one_line_warnings(f"lsmfm {command}"):
            return int(run(args) or 0)
    except KeyboardInterrupt:
        print(f"lsmfm {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - classified below: user error or bug
        message = user_error_message(exc, args)
        if message is not None:
            print(f"lsmfm {command}: error: {message}", file=sys.stderr)
            return 1
        traceback.print_exc()
        print(f"lsmfm {command}: internal error: this is a bug in lsmfm, not a problem with your input. "
              f"Please report it at {issues_url()} with the command line and the traceback above.",
              file=sys.stderr)
        return 1


@contextlib.contextmanager
def one_line_warnings(prefix: str) -> Iterator[None]:
    """Print lsmfm's own warnings as `lsmfm CMD: warning: ...` (others keep Python's format)."""
    default = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if issubclass(category, LsmfmWarning):
            kind = "note" if issubclass(category, LsmfmNotice) else "warning"
            print(f"{prefix}: {kind}: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = default
