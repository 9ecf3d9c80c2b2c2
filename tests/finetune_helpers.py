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
