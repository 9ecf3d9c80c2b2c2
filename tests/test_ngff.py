"""Every store lsmfm writes is valid NGFF 0.5 for other tools: ome-zarr-models validates its metadata
(image, labels, label images) and ome-zarr-py's Reader opens it with the whole pyramid (the path napari's
ome-zarr plugin takes)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from lsmfm.data.ingest.convert import ingest_array
from lsmfm.tasks.predict import PredictOptions, predict_volume
from test_predict import save_model, synthetic_volume, write_store

VOXEL = (2.0, 1.0, 1.0)


def validate_ngff(store: Path, labels: list[str], levels: int) -> None:
    """Open `store` as napari's plugin does and validate its NGFF 0.5 metadata (raises on any fault)."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel
    from ome_zarr_models.v05.labels import Labels

    group = zarr.open_group(str(store), mode="r")
    image = Image.from_zarr(group)  # raises on any invalid field
    assert len(image.attributes.ome.multiscales[0].datasets) == levels
    if labels:
        assert Labels.from_zarr(group["labels"]).attributes.ome.labels == labels
        for name in labels:
            ImageLabel.from_zarr(group[f"labels/{name}"])
    nodes = list(Reader(parse_url(str(store)))())
    first = nodes[0]
    assert first.load(Multiscales) is not None and len(first.data) == levels
    np.testing.assert_array_equal(np.asarray(first.data[-1]), group[str(levels - 1)][:])
    found = [n for n in nodes if n.load(Label) is not None]
    assert len(found) == len(labels)


@pytest.mark.parametrize("shard", [4, 1])
def test_ingested_store_with_labels(tmp_path, shard):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 1000, (40, 96, 80)).astype(np.uint16)
    store = ingest_array(vol, VOXEL, tmp_path / "img.zarr", labels={"bright": (vol > 900).astype(np.uint8)},
                         chunk=32, shard=shard, progress=False)
    validate_ngff(store, ["bright"], levels=3)


def test_ingested_store_with_two_channels(tmp_path):
    """Several sources are the channels of one image: one omero channel each, still valid NGFF."""
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 1000, (2, 40, 64, 48)).astype(np.uint16)
    store = ingest_array(vol, VOXEL, tmp_path / "two.zarr", chunk=32, progress=False)
    ome = zarr.open_group(str(store), mode="r").attrs["ome"]
    validate_ngff(store, [], levels=len(ome["multiscales"][0]["datasets"]))
    assert len(ome["omero"]["channels"]) == 2


@pytest.mark.parametrize("task", ["segment", "deblur"])
def test_prediction_stores(tmp_path, task):
    save_model(tmp_path / "model", task=task)
    src = write_store(tmp_path / "in.zarr", synthetic_volume((48, 64, 40)))
    out = tmp_path / "pred.zarr"
    summary = predict_volume(tmp_path / "model", src, out, PredictOptions(block=32), progress=False)
    validate_ngff(out, ["mask"] if task == "segment" else [], levels=summary["levels"])
    assert summary["levels"] >= 2


def test_finetune_prediction_files(tmp_path):
    from lsmfm.tasks.data import Patch
    from lsmfm.tasks.outputs import write_prediction

    patch = Patch(stem="p", path=tmp_path / "p.nii.gz", image=np.zeros((1, 24, 20, 16), np.float32),
                  voxel_size=VOXEL)
    out = write_prediction(np.random.default_rng(0).random((24, 20, 16), dtype=np.float32), patch, tmp_path,
                           "prob", "zarr")
    validate_ngff(out, [], levels=1)
