"""Downloads: release files into a cache (progress bar, size and sha256 or md5 check, atomic rename), and
weights folders from the Hugging Face Hub, pinned to the commit they resolved to.

The release cache is `$XDG_CACHE_HOME/lsmfm` (default `~/.cache/lsmfm`). A file reaches its final name
only after it was fully read and verified, so an interrupted download is never mistaken for a good one.
Hub folders go through huggingface_hub's own cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from lsmfm.errors import InputError
from lsmfm.progress import progress_bar
from lsmfm.weights.registry import Release

log = logging.getLogger(__name__)
CHUNK = 1 << 20
HF_PREFIX = "hf-hub:"


def hub_repo(name: str) -> str | None:
    """`org/name[@revision]` when `name` means a Hugging Face Hub repository, else None.

    The one meaning of a name for `load_pretrained` and every `from_pretrained`: `hf-hub:org/name`
    always, and a bare `org/name` (exactly one slash) that is neither a local path nor a registered
    release (callers check those first).
    """
    if name.startswith(HF_PREFIX):
        return name.removeprefix(HF_PREFIX)
    repo = name.partition("@")[0]
    parts = repo.split("/")
    return name if len(parts) == 2 and all(parts) else None


def snapshot(repo: str, revision: str | None = None, **hub_kwargs: Any) -> Path:
    """Download (or reuse from the HF cache) the weights folder of `org/name[@revision]`."""
    from huggingface_hub import snapshot_download

    from lsmfm.weights.format import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

    repo_id, _, rev = repo.partition("@")
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision or rev or None,
                                 allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, CARD_NAME], **hub_kwargs)
    except Exception as exc:  # offline, missing repo, auth: all reported the same way
        raise InputError(HF_PREFIX + repo, "not a local file or folder nor a registered release, and it "
                                           f"could not be fetched from the Hugging Face Hub: {exc}") from exc
    return Path(path)


def cache_dir() -> Path:
    """Where releases are kept: $XDG_CACHE_HOME/lsmfm, else ~/.cache/lsmfm."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lsmfm"


def digests_of(path: str | Path) -> dict[str, str]:
    """sha256 and md5 of a file, in one read."""
    hashes = {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False)}
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            for h in hashes.values():
                h.update(block)
    return {k: h.hexdigest() for k, h in hashes.items()}


def recorded_sha256(target: Path) -> Path:
    """The sidecar holding the sha256 a file without a published hash had when first downloaded."""
    return target.with_name(target.name + ".sha256")


def fetch_release(release: Release, cache: str | Path | None = None, progress: bool = True) -> Path:
    """The cached file of `release`, downloaded and verified first if needed. A cached file that fails
    its check is refused (never silently replaced: it was verified when it arrived, so it changed since)."""
    target = Path(cache or cache_dir()) / "releases" / release.name / release.filename
    if target.is_file():
        problem = check_file(target, release.sha256, release.md5, release.size, _first_sha256(target))
        if problem:
            raise InputError(target, f"cached file fails its check ({problem}); it changed after it was "
                                     "verified: delete it to download it again")
        return target
    return download(release.url, target, sha256=release.sha256, size=release.size, md5=release.md5,
                    progress=progress)


def _first_sha256(target: Path) -> str | None:
    side = recorded_sha256(target)
    return side.read_text().strip() if side.is_file() else None


def check_file(path: Path, sha256: str | None, md5: str | None, size: int | None,
               first_sha256: str | None = None) -> str | None:
    """What is wrong with `path` against the expected size and digests (sha256 first, else md5, else
    the sha256 it had on first download), or None."""
    if size is not None and path.stat().st_size != size:
        return f"{path.stat().st_size} bytes, expected {size}"
    return _digest_problem(digests_of(path), sha256, md5, first_sha256)


def _digest_problem(got: dict[str, str], sha256: str | None, md5: str | None,
                    first_sha256: str | None = None) -> str | None:
    if sha256 is not None:
        kind, key, want = "sha256", "sha256", sha256
    elif md5 is not None:
        kind, key, want = "md5", "md5", md5
    elif first_sha256 is not None:
        kind, key, want = "sha256 recorded at its first download", "sha256", first_sha256
    else:
        return None
    return None if got[key] == want.lower() else f"{kind} mismatch: expected {want.lower()}, got {got[key]}"


def download(url: str, target: str | Path, sha256: str | None = None, size: int | None = None,
             progress: bool = True, md5: str | None = None) -> Path:
    """Stream `url` to `target` (temp file, verify, rename); a size or digest mismatch deletes it and
    raises. Without sha256 and md5 the file's sha256 is recorded beside it (checked on every later use)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(name)
    try:
        got, n = _stream(url, fd, size, target.name, progress)
        if size is not None and n != size:
            raise InputError(url, f"download has {n} bytes, expected {size}; deleted")
        problem = _digest_problem(got, sha256, md5)
        if problem:
            raise InputError(url, f"{problem}; the download was deleted")
        if sha256 is None and md5 is None:
            log.warning("%s: no published sha256 or md5 to verify against; this download's sha256 is %s, "
                        "recorded in %s and checked on every later use", url, got["sha256"],
                        recorded_sha256(target))
            recorded_sha256(target).write_text(got["sha256"] + "\n")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _stream(url: str, fd: int, size: int | None, label: str, progress: bool) -> tuple[dict[str, str], int]:
    hashes = {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False)}
    n = 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or size
            with progress_bar(total=total, unit="B", unit_scale=True, desc=f"download {label}",
                              enabled=progress) as bar:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    out.write(block)
                    for h in hashes.values():
                        h.update(block)
                    n += len(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InputError(url, f"download failed: {exc}") from exc
    return {k: h.hexdigest() for k, h in hashes.items()}, n
