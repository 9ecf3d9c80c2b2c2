"""Downloads: release files into a cache (progress bar, size and sha256 check, atomic rename), and
weights folders from the Hugging Face Hub.

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


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def fetch_release(release: Release, cache: str | Path | None = None, progress: bool = True) -> Path:
    """The cached file of `release`, downloaded and verified first if needed."""
    target = Path(cache or cache_dir()) / "releases" / release.name / release.filename
    if target.is_file():
        if _cached_ok(release, target):
            return target
        log.warning("%s: cached file fails its check, downloading again", target)
        target.unlink()
    return download(release.url, target, sha256=release.sha256, size=release.size, progress=progress)


def _cached_ok(release: Release, target: Path) -> bool:
    if release.size is not None and target.stat().st_size != release.size:
        return False
    return release.sha256 is None or sha256_of(target) == release.sha256.lower()


def download(url: str, target: str | Path, sha256: str | None = None, size: int | None = None,
             progress: bool = True) -> Path:
    """Stream `url` to `target` (temp file, verify, rename); a hash or size mismatch deletes it and raises."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(name)
    try:
        digest, n = _stream(url, fd, size, target.name, progress)
        if size is not None and n != size:
            raise InputError(url, f"download has {n} bytes, expected {size}; deleted")
        if sha256 is not None and digest != sha256.lower():
            raise InputError(url, f"sha256 mismatch: expected {sha256.lower()}, got {digest}; "
                                  "the download was deleted")
        if sha256 is None:
            log.warning("%s: no published sha256 to verify against; this download's sha256 is %s",
                        url, digest)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _stream(url: str, fd: int, size: int | None, label: str, progress: bool) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or size
            with progress_bar(total=total, unit="B", unit_scale=True, desc=f"download {label}",
                              enabled=progress) as bar:
                for block in iter(lambda: resp.read(CHUNK), b""):
                    out.write(block)
                    h.update(block)
                    n += len(block)
                    bar.update(len(block))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InputError(url, f"download failed: {exc}") from exc
    return h.hexdigest(), n
