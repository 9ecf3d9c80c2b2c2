"""Exceptions that carry what was wrong and where, so the CLI can print one clear line."""
from __future__ import annotations

from pathlib import Path


class LsmfmError(Exception):
    """Base class for errors the user can fix (bad input, bad config); the CLI prints them without a traceback."""


class InputError(LsmfmError, ValueError):
    """A file or value given by the user is unusable; the message names the file and the problem."""

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ConfigError(LsmfmError, ValueError):
    """A configuration file or override is invalid; the message names the key."""


class LsmfmWarning(UserWarning):
    """Something the user should know that does not stop the run; the CLI prints it as one line."""


class LsmfmNotice(LsmfmWarning):
    """A choice lsmfm made for the user and why (not a problem); the CLI prints it as one `note:` line."""
