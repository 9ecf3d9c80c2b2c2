"""Import the LSM foundation model paper's data layout (arXiv 2605.26026) as catalog entries.

Its archives hold `ROOT/<volume folder>/input/*.nii.gz` (96³ patches of one volume) and a JSON file
mapping each folder name (case-insensitively) to a text prompt. Each folder becomes one catalog entry
whose store is a collection folder with one OME-Zarr image per patch; the prompt becomes its
description, and stain and organism are read from the prompt's words.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from lsmfm.data.catalog.entries import collection_sources, load_catalog, relative_to, write_catalog
from lsmfm.errors import InputError
from lsmfm.io.omezarr import SHARD_CHUNKS
from lsmfm.io.volumes import open_volume

PAPER_CITATION = "LSM foundation model, arXiv 2605.26026"

# Marker and dye names as they appear in prompts -> the name used in catalogs, in matching order.
STAINS = [
    (r"tyrosine hydroxylase|\bTH\b", "TH"), (r"\bCTIP2\b", "CTIP2"), (r"\bGFAP\b", "GFAP"),
    (r"\bp75NTR\b", "p75NTR"), (r"dopamine beta-hydroxylase|\bDBH\b", "DBH"), (r"\bSYTO ?\d+", None),
    (r"\btdTomato\b", "tdTomato"), (r"green fluorescent protein|\bGFP\b", "GFP"), (r"\bDAPI\b", "DAPI"),
    (r"\bNeuN\b", "NeuN"), (r"\bTO-PRO-3\b", "TO-PRO-3"), (r"\blectin\b", "lectin"),
    (r"\bparvalbumin\b", "parvalbumin"), (r"\bmethoxy-X04\b", "methoxy-X04"), (r"\bCongo red\b", "Congo red"),
]
ORGANISMS = ("mouse", "rat", "human", "macaque", "marmoset", "zebrafish", "drosophila")


def stain_from_text(text: str) -> str:
    """Stains named in `text` (first mention first) and the excitation channel, e.g. 'TH (639 nm)'."""
    found = []
    for pattern, name in STAINS:
        m = re.search(pattern, text)
        if m:
            found.append((m.start(), name or m.group(0)))
    names = ", ".join(dict.fromkeys(n for _, n in sorted(found)))
    nm = re.search(r"(\d{3}) ?nm", text)
    return f"{names} ({nm.group(1)} nm)" if names and nm else names


def organism_from_text(text: str) -> str:
    lower = text.lower()
    return next((o for o in ORGANISMS if re.search(rf"\b{o}\b", lower)), "")


def read_prompts(path: str | Path) -> dict[str, list[str]]:
    """The prompt JSON as {lower-case folder name: [descriptions]} (values may be a text or a list)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"cannot read the text-prompt JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InputError(path, "text-prompt JSON must map folder names to texts")
    out = {}
    for key, value in data.items():
        texts = [value] if isinstance(value, str) else value
        valid = isinstance(texts, list) and texts and all(isinstance(t, str) and t.strip() for t in texts)
        if not valid:
            raise InputError(path, f"prompt for {key!r} must be a non-empty text or list of texts")
        out[str(key).lower()] = texts
    return out


def paper_folders(root: str | Path) -> list[Path]:
    """Volume folders of the paper's layout: ROOT/<folder>/input/ holding patch files."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a folder")
    folders = sorted(p for p in root.iterdir() if (p / "input").is_dir())
    if not folders:
        raise InputError(root, "no <volume folder>/input/ patch folders found (expected the paper's layout)")
    return folders


def paper_entries(root: str | Path, prompts: str | Path, stores: str | Path, catalog: str | Path
                  ) -> list[dict[str, Any]]:
    """Catalog entries (plain dicts, paths relative to the catalog's folder) for every volume folder."""
    texts, here = read_prompts(prompts), Path(catalog).resolve().parent
    entries = []
    for folder in paper_folders(root):
        descriptions = texts.get(folder.name.lower())
        if descriptions is None:
            raise InputError(folder, f"no text prompt for this folder in {prompts} (case-insensitive keys)")
        patches = collection_sources(folder / "input")
        if not patches:
            raise InputError(folder / "input", "no patch files (.nii.gz, .nii, .tif)")
        voxel = open_volume(patches[0]).voxel_size
        entries.append({
            "id": folder.name, "store": relative_to(Path(stores) / folder.name, here),
            "source": relative_to(folder / "input", here), "channel": 0,
            "organism": organism_from_text(descriptions[0]), "stain": stain_from_text(descriptions[0]),
            "voxel_size": [round(v, 4) for v in voxel], "descriptions": descriptions})
    return entries


def import_paper(root: str | Path, prompts: str | Path, stores: str | Path, out: str | Path,
                 ingest: bool = True, licence: str = "MIT", citation: str = PAPER_CITATION,
                 progress: bool = True, shard: int = SHARD_CHUNKS) -> Path:
    """Write a catalog for the paper's layout at `out` and (unless `ingest=False`) ingest every patch."""
    entries = paper_entries(root, prompts, stores, out)
    here = Path(out).resolve().parent
    header = (f"Imported from the LSM foundation model paper's layout by `lsmfm catalog import-paper`.\n"
              f"Patches: {relative_to(root, here)}\nPrompts: {relative_to(prompts, here)}\n"
              "(paths relative to this file)")
    defaults = {"licence": licence, "citation": citation}
    if not ingest:
        return write_catalog(out, entries, defaults=defaults, header=header)
    from lsmfm.data.catalog.materialize import ingest_entry

    staged = write_catalog(Path(out).with_name(Path(out).name + ".partial"), entries, defaults=defaults,
                           header=header)
    try:
        for entry in load_catalog(staged):
            ingest_entry(entry, progress=progress, shard=shard)
        staged.replace(out)
    finally:
        staged.unlink(missing_ok=True)
    return Path(out)
