"""`lsmfm demo`, the embedded default, run as a user runs it (shortened pretraining)."""
from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import zipfile

import pytest

from lsmfm.cli.main import main
from lsmfm.errors import InputError


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "lsmfm.cli.main", "demo", "--out", str(out), "--pretrain-steps", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(out / "compare_segment" / "results.csv") as fh:
        compared = list(csv.DictReader(fh))
    assert {(r["arm"], r["kind"]) for r in compared} == {("demo_pretrained", "3d"), ("scratch", "3d"),
                                                       ("sam_lora_tiny", "2d")}
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in compared) and len(compared) == 12
    assert (out / "compare_segment" / "dice_vs_shots.png").is_file()
    assert (out / "weights" / "model.safetensors").is_file()
    assert (out / "prediction.zarr" / "labels" / "mask").is_dir()
    if importlib.util.find_spec("bioimageio") is not None:
        assert zipfile.is_zipfile(out / "segment.bioimageio.zip")
    assert "Demo finished" in done.stdout and done.stdout.rstrip().endswith("|")  # ends with the table
    assert "| sam_lora_tiny | 2d | 4 | 2 |" in done.stdout.split("Demo finished")[1]


def test_demo_replaces_its_own_earlier_output(tmp_path):
    from lsmfm.cli.demo import MARKER, _reset_demo_dir

    _reset_demo_dir(tmp_path / "demo")
    (tmp_path / "demo" / "old_run.txt").write_text("stale")
    with pytest.raises(InputError, match="pass --overwrite"):
        _reset_demo_dir(tmp_path / "demo")
    _reset_demo_dir(tmp_path / "demo", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [MARKER]


def test_demo_refuses_a_folder_it_did_not_make(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--overwrite"]) == 1
    assert "was not made by `lsmfm demo`" in capsys.readouterr().err
    assert (tmp_path / "precious.txt").read_text() == "keep me"
