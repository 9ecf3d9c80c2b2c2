"""Progress bars that suit where the output goes: a live bar on a terminal, periodic plain lines in the
log of a batch job (no carriage returns), nothing with `--quiet`.

Every long loop in lsmfm makes its bar with `progress_bar`; `LSMFM_PROGRESS` picks the style whatever
the output is (`bar`, `lines` or `off`), and `LSMFM_PROGRESS_INTERVAL` the seconds between two lines
(default 30; the first and the last state are always printed).

Example:
    >>> for block in progress_bar(blocks, desc="predict", unit="block", enabled=not args.quiet):
    ...     run(block)
"""
from __future__ import annotations

import os
import re
import sys
from typing import Any, Iterable, TextIO

from tqdm import tqdm as _std_tqdm

STYLES = ("bar", "lines", "off")
DEFAULT_INTERVAL = 30.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def progress_style(stream: TextIO | None = None) -> str:
    """"bar" on a terminal (or in a notebook), "lines" otherwise; `LSMFM_PROGRESS` overrides."""
    chosen = os.environ.get("LSMFM_PROGRESS", "").strip().lower()
    if chosen in STYLES:
        return chosen
    stream = sys.stderr if stream is None else stream
    if "ipykernel" in sys.modules:
        return "bar"
    isatty = getattr(stream, "isatty", None)
    return "bar" if isatty is not None and isatty() else "lines"


def line_interval() -> float:
    try:
        return max(0.0, float(os.environ.get("LSMFM_PROGRESS_INTERVAL", DEFAULT_INTERVAL)))
    except ValueError:
        return DEFAULT_INTERVAL


class _LineWriter:
    """A file for tqdm that turns each refresh into one complete line and drops clears and cursor moves."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> None:
        line = _ANSI.sub("", str(text)).replace("\r", "").strip()
        if line and line != self.last:
            self.stream.write(line + "\n")
            self.stream.flush()
            self.last = line

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str = "", total: float | None = None,
                 unit: str = "it", enabled: bool = True, leave: bool = True, **kwargs: Any) -> Any:
    """A tqdm bar (an iterable wrapper with `update`, `set_postfix`, `close`) in the style of the output.

    Args:
        iterable: what to iterate over (None: call `update(n)` yourself).
        desc, total, unit, leave: as tqdm's; `total` defaults to `len(iterable)`.
        enabled: False (`--quiet`) gives a silent bar with the same interface.
        kwargs: further tqdm arguments (`initial`, `unit_scale`, ...).
    """
    style = progress_style() if enabled else "off"
    if style == "off":
        return _std_tqdm(iterable, desc=desc, total=total, unit=unit, disable=True, **kwargs)
    if style == "bar":
        from tqdm.auto import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, dynamic_ncols=True, **kwargs)
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    interval = line_interval()
    fmt = LINE_FORMAT if total else LINE_FORMAT_NO_TOTAL
    return _std_tqdm(iterable, desc=desc, total=total, unit=unit, leave=True, file=_LineWriter(sys.stderr),
                     mininterval=interval, maxinterval=max(interval, 10.0), bar_format=fmt, ascii=True,
                     **kwargs)
