"""Shared by the trainer tests (test_pretrain, test_resume, test_pretrain_distributed): tiny synthetic
OME-Zarr stores with a catalog, tiny-recipe overrides, and the real CLI in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "pretrain" / "tiny.yaml"
DESCRIPTIONS = {"cell_nucleus": ["synthetic light-sheet volume with a nuclear stain: round nuclei",
                                 "simulated cleared brain tissue, densely packed bright cell nuclei"],
                "vessels": ["synthetic light-sheet volume with a vascular stain: tubular vessels",
                            "simulated cleared brain tissue, branching capillaries and larger vessels"]}


def synthetic_catalog(root: Path, size: int = 48) -> Path:
    """Two synthetic volumes (nuclei, vessels) ingested as OME-Zarr, and a catalog naming them."""
    from lsmfm.data.catalog.entries import write_catalog
    from lsmfm.data.ingest.convert import ingest_array
    from lsmfm.data.synthetic.volume import generate_volume, preset_config

    entries = []
    for i, (structure, texts) in enumerate(DESCRIPTIONS.items()):
        vol = generate_volume(preset_config(structure, (size,) * 3, seed=i))
        store = root / "stores" / f"{structure}.zarr"
        ingest_array(vol.image, vol.voxel_size, store, progress=False)
        entries.append({"id": structure, "store": str(store), "descriptions": texts})
    return write_catalog(root / "catalog.yaml", entries)


def tiny_overrides(catalog: Path, steps: int, **extra: object) -> list[str]:
    """Overrides of the tiny recipe for tests: this catalog, `steps` steps, one thread, every step logged."""
    items = {"data.catalogs": f"[{catalog}]", "train.max_steps": steps, "train.num_threads": 1,
             "train.log_every": 1, **extra}
    return [f"{k}={v}" for k, v in items.items()]


def cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `lsmfm <args>` (the real entry point) in a subprocess, offline, stdout and stderr merged.

    Distributed variables come only from `env`, so a run is one process unless a test says otherwise.
    """
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(key, None)
    full_env.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "lsmfm.cli.main", *args], env=full_env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
