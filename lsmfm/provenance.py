"""Which lsmfm wrote a file: its version and, from a git checkout, the commit (and whether the checkout
had uncommitted changes). Recorded in every resolved config, checkpoint, model folder's config.json,
bioimage.io package and store attributes, under the key `provenance`.

Example:
    >>> provenance()
    {'lsmfm_version': '0.1.0', 'git_commit': '3f03b40...', 'git_dirty': False}
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

VERSION = "0.1.0"  # the one place of the version: `lsmfm.__version__` and the package metadata read it
KEY = "provenance"
SOURCE_ROOT = Path(__file__).resolve().parents[1]


def version() -> str:
    return VERSION


@functools.lru_cache(maxsize=1)
def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout lsmfm is imported from; (None, None) for an installed wheel."""
    if not (SOURCE_ROOT / ".git").exists():
        return None, None
    try:
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "lsmfm", "pyproject.toml"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, dirty


def _git(*args: str) -> str:
    """Read-only: `git status` would otherwise refresh the checkout's index under `index.lock`, which a
    user's own git command (or a run killed meanwhile) then trips over."""
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    done = subprocess.run(["git", "-C", str(SOURCE_ROOT), *args], capture_output=True, text=True, timeout=10,
                          check=True, env=env)
    return done.stdout.strip()


def provenance() -> dict[str, Any]:
    """{"lsmfm_version", "git_commit", "git_dirty"}: the running lsmfm, for files it writes."""
    commit, dirty = git_state()
    return {"lsmfm_version": version(), "git_commit": commit, "git_dirty": dirty}


def version_line() -> str:
    """`lsmfm --version`: the version, and the commit when run from a git checkout."""
    commit, dirty = git_state()
    if commit is None:
        return f"lsmfm {version()}"
    return f"lsmfm {version()} (git {commit[:12]}{', uncommitted changes' if dirty else ''})"
