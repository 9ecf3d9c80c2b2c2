"""How to cite lsmfm and the LSM foundation model paper, and where each lives: the one place model cards,
bioimage.io packages and error messages take them from (`CITATION.cff` states the same; a test checks)."""
from __future__ import annotations

PAPER = "LSM foundation model paper (arXiv 2605.26026)"
PAPER_DOI = "10.48550/arXiv.2605.26026"
PAPER_URL = "https://arxiv.org/abs/2605.26026"
PAPER_CODE_URL = "https://github.com/AdinaScheinfeld/lsm_fm_public_repo"
MONAI = "MONAI: An open-source framework for deep learning in healthcare (arXiv 2211.02701)"
MONAI_DOI = "10.48550/arXiv.2211.02701"


def project_url(label: str) -> str | None:
    """A `[project.urls]` entry of the installed lsmfm ("Repository", "Issues"), or None."""
    from importlib import metadata

    try:
        entries = metadata.metadata("lsmfm").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    for entry in entries:
        name, _, url = entry.partition(",")
        if name.strip().lower() == label.lower():
            return url.strip()
    return None


def lsmfm_citation() -> str:
    """One line citing lsmfm itself, with its version and repository."""
    from lsmfm.provenance import version

    where = project_url("Repository")
    text = f"lsmfm {version()}: 3D foundation models for light-sheet microscopy"
    return text + (f", {where}" if where else "")
