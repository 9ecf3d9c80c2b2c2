"""Provenance: the lsmfm version and git commit in every resolved config, checkpoint, model folder
(config.json and the safetensors header) and store it writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml

from lsmfm import __version__
from lsmfm.config import load_config, save_config
from lsmfm.provenance import SOURCE_ROOT, provenance

REPO = Path(__file__).resolve().parents[1]


def expected() -> dict:
    """What provenance must say here: the version, and the commit when lsmfm runs from a checkout."""
    if (SOURCE_ROOT / ".git").exists():
        commit = subprocess.run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        return {"lsmfm_version": __version__, "git_commit": commit}
    return {"lsmfm_version": __version__, "git_commit": None}


def test_provenance_names_the_version_and_commit():
    record = provenance()
    assert {k: record[k] for k in ("lsmfm_version", "git_commit")} == expected()
    assert record["git_dirty"] in (True, False, None)


@dataclass
class Small:
    a: int = 1
    b: list[int] = field(default_factory=lambda: [1, 2])


def test_resolved_configs_record_provenance_and_still_load(tmp_path):
    save_config(Small(a=3), tmp_path / "config.yaml")
    data = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert data["provenance"]["lsmfm_version"] == __version__
    assert data["provenance"]["git_commit"] == expected()["git_commit"]
    assert load_config(Small, tmp_path / "config.yaml") == Small(a=3)  # the record is not a setting


def test_model_folders_record_provenance(tmp_path):
    import lsmfm
    from lsmfm.models.backbones.unet import UNetConfig
    from lsmfm.weights.format import METADATA_KEY, read_safetensors

    net = UNetConfig(channels=[4, 8], strides=[2], out_channels=4).build()
    net.save_pretrained(tmp_path / "w")
    on_disk = json.loads((tmp_path / "w" / "config.json").read_text())["provenance"]
    assert {k: on_disk[k] for k in ("lsmfm_version", "git_commit")} == expected()
    _, header = read_safetensors(tmp_path / "w" / "model.safetensors")
    assert json.loads(header[METADATA_KEY])["provenance"] == on_disk
    assert lsmfm.load_pretrained(tmp_path / "w").lsmfm_config.provenance == on_disk
    assert f"lsmfm {__version__}" in (tmp_path / "w" / "README.md").read_text()


def test_stores_record_provenance(tmp_path):
    import zarr

    from lsmfm.data.ingest.convert import ingest_array

    rng = np.random.default_rng(0)
    out = ingest_array(rng.integers(0, 1000, (24, 24, 24)).astype(np.uint16), (2.0, 1.0, 1.0),
                       tmp_path / "v.zarr", progress=False)
    record = dict(zarr.open_group(str(out), mode="r").attrs)["lsmfm"]["provenance"]
    assert {k: record[k] for k in ("lsmfm_version", "git_commit")} == expected()


def test_checkpoints_record_provenance(tmp_path):
    """The client state and the tag's config.yaml, as `checkpoint.save` writes them."""
    from lsmfm.training import checkpoint

    class Engine:
        global_rank = 0

        def save_checkpoint(self, root, tag, client_state, save_latest):
            (Path(root) / tag).mkdir(parents=True)
            (Path(root) / tag / "client_state.json").write_text(json.dumps(client_state["provenance"]))

    tag = checkpoint.save(Engine(), tmp_path, 3, {"config": {"train": {"max_steps": 3}}})
    folder = tmp_path / "checkpoints" / tag
    assert json.loads((folder / "client_state.json").read_text())["lsmfm_version"] == __version__
    saved = yaml.safe_load((folder / "config.yaml").read_text())
    assert saved["train"] == {"max_steps": 3}
    assert saved["provenance"]["git_commit"] == expected()["git_commit"]


def test_reading_the_git_state_never_writes_the_checkouts_index():
    """`git status` refreshes a stale index under `index.lock`; lsmfm's provenance must leave it alone
    (a user's own git command, or a run under a file-size limit, would trip over the lock)."""
    if not (SOURCE_ROOT / ".git").exists():
        pytest.skip("lsmfm is not imported from a git checkout")
    index = Path(subprocess.run(["git", "-C", str(SOURCE_ROOT), "rev-parse", "--absolute-git-dir"],
                                capture_output=True, text=True, check=True).stdout.strip()) / "index"
    before = index.stat().st_mtime_ns
    tracked = SOURCE_ROOT / "lsmfm" / "errors.py"
    os.utime(tracked)  # its recorded stat data is now stale: a plain `git status` would rewrite the index
    code = "from lsmfm.provenance import git_state; print(git_state())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("('"), done.stderr
    assert index.stat().st_mtime_ns == before and not index.with_name("index.lock").exists()
