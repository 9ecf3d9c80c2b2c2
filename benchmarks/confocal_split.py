"""Few-shot split of confocal_nuclei_instances: train on octants of one volume, validate and test on the others.

    .venv/bin/python benchmarks/confocal_split.py [--out runs/data/confocal_nuclei_split]

The dataset has three annotated 100³ volumes, but the image of 1137 is noise: its intensities do not
follow its labels (correlation 0.01 with label > 0, against 0.48 and 0.39 for 1135 and 1136; nuclei mean
127.4 vs background 125.1), so no model can segment it and it is left out. A shot is one 50³ octant of
volume 1135 (8 octants, 4-18 nuclei each); validation is the upper z half of 1136 (50 x 100 x 100) and
test its lower z half. The test half is never seen, neither by finetuning nor by the in-domain pretraining
(data_catalog/confocal_nuclei_unlabelled.yaml lists 1135 and the validation half, which this script
writes: run it before `lsmfm catalog ingest`). Labels are kept as instances (finetune with
segment.binarize=true). ImageJ TIFFs with the source's voxel size (z, y, x µm).
"""
from __future__ import annotations

import argparse
import itertools
import shutil
from pathlib import Path

import numpy as np
import tifffile

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO.parent / "shared" / "data" / "confocal_nuclei_instances"
TRAIN, HELD_OUT = "1135_mini", "1136_mini"


def read(stem: str) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Image, instance labels and voxel size (z, y, x µm) of one source volume."""
    with tifffile.TiffFile(SOURCE / f"{stem}.tif") as tif:
        image = tif.asarray()
        z = float(tif.imagej_metadata.get("spacing", 1.0))
        num, den = tif.pages[0].tags["XResolution"].value
    return image, tifffile.imread(SOURCE / f"{stem}_label.tif"), (z, den / num, den / num)


def write(folder: Path, stem: str, image: np.ndarray, label: np.ndarray,
          spacing: tuple[float, float, float]) -> None:
    """One image and its label as ImageJ TIFFs carrying the voxel size."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix, arr in (("", image), ("_label", label)):
        tifffile.imwrite(folder / f"{stem}{suffix}.tif", np.ascontiguousarray(arr), imagej=True,
                         resolution=(1 / spacing[2], 1 / spacing[1]),
                         metadata={"spacing": spacing[0], "unit": "um", "axes": "ZYX"})


def octants(image: np.ndarray) -> list[tuple[slice, ...]]:
    """The 8 half-size corner blocks, in z-y-x order."""
    halves = [(slice(0, n // 2), slice(n // 2, n)) for n in image.shape]
    return list(itertools.product(*halves))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "data" / "confocal_nuclei_split")
    args = parser.parse_args()
    if not SOURCE.is_dir():
        raise SystemExit(f"{SOURCE}: not found (the project's shared data folder)")
    shutil.rmtree(args.out, ignore_errors=True)
    image, label, spacing = read(TRAIN)
    for i, region in enumerate(octants(image)):
        write(args.out / "train", f"{TRAIN}_octant{i}", image[region], label[region], spacing)
        print(f"train {TRAIN}_octant{i}: {len(np.unique(label[region])) - 1} nuclei, "
              f"foreground {np.mean(label[region] > 0):.3f}")
    image, label, spacing = read(HELD_OUT)
    half = image.shape[0] // 2
    for split, part, region in (("val", "ztop", slice(0, half)), ("test", "zbottom", slice(half, None))):
        stem = f"{HELD_OUT}_{part}"
        write(args.out / split, stem, image[region], label[region], spacing)
        print(f"{split} {stem}: {len(np.unique(label[region])) - 1} nuclei, "
              f"foreground {np.mean(label[region] > 0):.3f}")


if __name__ == "__main__":
    main()
