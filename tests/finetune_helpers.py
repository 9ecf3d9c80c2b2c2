"""Tiny finetuning fixtures shared by the tests/test_finetune_*.py files: patch folders, a tiny backbone."""
from __future__ import annotations

from pathlib import Path

import numpy as np

TINY_BACKBONE = ["backbone.channels=[8,16,32]", "backbone.strides=[2,2]", "backbone.out_channels=8",
                 "backbone.num_res_units=1"]


def write_nifti(path: Path, zyx: np.ndarray) -> None:
    """Save a (Z, Y, X) array as NIfTI (stored X, Y, Z as nibabel expects)."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.transpose(zyx, (2, 1, 0)), np.eye(4)), str(path))


def scene(cls: str, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image and its binary mask: bright balls ("cell_nucleus") or straight tubes ("vessels")."""
    zz, yy, xx = np.mgrid[:size, :size, :size]
    mask = np.zeros((size,) * 3, bool)
    for _ in range(3):
        c = rng.uniform(6, size - 6, 3)
        if cls == "cell_nucleus":
            mask |= (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < rng.uniform(9, 25)
        else:
            mask |= (yy - c[1]) ** 2 + (xx - c[2]) ** 2 < 4
    image = (100 + 800 * mask + rng.normal(0, 60, mask.shape)).astype(np.float32)
    return image, mask.astype(np.uint8)


def write_dataset(root: Path, n_train: int = 2, n_eval: int = 1, size: int = 32) -> dict[str, Path]:
    """train/val/test folders of the synthetic generator (`<structure>_patch_NNN_volNNN_ch0` + `_label` +
    `_blurred`), `n_train` / `n_eval` patches per structure (amyloid_plaque, cell_nucleus, vessels)."""
    from lsmfm.data.synthetic.write import write_finetune_patches

    write_finetune_patches(root, {"train": n_train, "val": n_eval, "test": n_eval}, patch=size, seed=0,
                           progress=False)
    return {split: root / split for split in ("train", "val", "test")}


def data_overrides(dirs: dict[str, Path]) -> list[str]:
    return [f"data.{split}_dir={path}" for split, path in dirs.items()]


TIMING = ("train_seconds", "sec_per_iter", "peak_memory_mb")  # measured: differ between two runs


def results(run: Path) -> list[dict[str, str]]:
    import csv

    with open(run / "results.csv") as fh:
        return list(csv.DictReader(fh))


def without_timing(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def cli(args: list[str]) -> list[str]:
    """The `lsmfm` command line as a subprocess runs it."""
    import sys

    return [sys.executable, "-m", "lsmfm.cli.main", *args]


def wait_rows(run: Path, proc, n: int, timeout: float = 300) -> int:
    """Wait until results.csv holds at least `n` rows while `proc` (a Popen) is still running."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "results.csv").is_file() and len(results(run)) >= n:
            return len(results(run))
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {n} rows"
        time.sleep(0.1)
    raise AssertionError(f"no {n} rows in {run / 'results.csv'} within {timeout} s")


def kill_resume_sigterm_resume(args: list[str], run: Path, total: int, env: dict) -> tuple[int, str]:
    """kill -9 a run after its first row, resume it in a new process, SIGTERM that one after one more
    row; returns (its exit status, its output). The folder is then ready for a last `--resume`."""
    import signal
    import subprocess

    proc = subprocess.Popen(cli([*args, "--out", str(run), "--quiet"]), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    done = wait_rows(run, proc, 1)
    proc.kill()
    proc.wait()
    assert 1 <= done < total
    refused = subprocess.run(cli([*args, "--out", str(run), "--quiet"]), env=env, capture_output=True,
                             text=True)
    assert refused.returncode == 1 and "--resume" in refused.stderr  # an existing run is never mixed in
    proc = subprocess.Popen(cli([*args, "--out", str(run), "--quiet", "--resume"]), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_rows(run, proc, done + 1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out
