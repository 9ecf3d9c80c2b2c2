"""Patch streaming: determinism per (seed, rank, index), worker split and resume, foreground sampling,
normalisation by ingest statistics, resampling, bad input, the report and CLI, and real data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lsmfm.cli.main import main
from lsmfm.config import load_config
from lsmfm.data.catalog.entries import write_catalog
from lsmfm.data.ingest.convert import ingest_array
from lsmfm.data.normalize import percentile_normalize
from lsmfm.data.stream.config import ForegroundConfig
from lsmfm.data.stream.sampling import (ForegroundMap, choose_position, choose_weighted, plan_image,
                                        sample_rng, worker_indices)
from lsmfm.data.stream.config import StreamConfig
from lsmfm.data.stream.dataset import PatchStream, make_loader, stream_report
from lsmfm.errors import ConfigError, InputError, LsmfmError
from lsmfm.io.omezarr import open_image, stored_percentile


def _half_bright(shape=(48, 48, 48), seed=0) -> np.ndarray:
    """Dim noisy background in x < half, bright textured tissue in x >= half."""
    rng = np.random.default_rng(seed)
    vol = rng.normal(100, 5, shape)
    vol[..., shape[2] // 2:] += rng.gamma(2.0, 400.0, (*shape[:2], shape[2] - shape[2] // 2))
    return vol.clip(0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stream")
    half = ingest_array(_half_bright(), (2.0, 1.0, 1.0), root / "half.zarr", chunk=16, progress=False)
    rng = np.random.default_rng(1)
    small = ingest_array(rng.gamma(2.0, 300.0, (16, 24, 24)).astype(np.uint16), (1.0, 1.0, 1.0),
                         root / "small.zarr", chunk=16, progress=False)
    catalog = write_catalog(root / "catalog.yaml", [
        {"id": "half", "store": "half.zarr", "descriptions": ["half bright A", "half bright B",
                                                              "half bright C"]},
        {"id": "small", "store": "small.zarr", "descriptions": ["small volume"], "weight": 3.0},
    ])
    half_only = write_catalog(root / "half.yaml",
                              [{"id": "half", "store": "half.zarr", "descriptions": ["h"]}])
    return {"root": root, "half": half, "small": small, "catalog": catalog, "half_catalog": half_only}


def _cfg(stores, *overrides: str) -> StreamConfig:
    cfg = load_config(StreamConfig, None, ["patch_size=[16, 16, 16]", *overrides])
    cfg.catalogs = [str(stores["catalog"])]
    return cfg


def _same(a: dict, b: dict) -> bool:
    return a["source"] == b["source"] and a["text"] == b["text"] and torch.equal(a["image"], b["image"])


def test_sample_is_a_function_of_seed_rank_index(stores):
    cfg = _cfg(stores)
    a, b = PatchStream(cfg, seed=3), PatchStream(cfg, seed=3)
    for i in (0, 1, 7):
        assert _same(a.sample(i), b.sample(i))
    first = a.sample(0)
    assert first["image"].shape == (1, 16, 16, 16) and first["image"].dtype == torch.float32
    assert first["index"] == 0 and first["source"] in ("half", "small")
    other_rank = PatchStream(cfg, rank=1, world_size=2, seed=3)
    assert not any(_same(a.sample(i), other_rank.sample(i)) for i in range(4))
    assert not _same(first, PatchStream(cfg, seed=4).sample(0))
    assert [s["index"] for _, s in zip(range(3), a)] == [0, 1, 2]


def test_worker_indices_partition_the_stream():
    take = lambda it, n: [next(it) for _ in range(n)]  # noqa: E731
    assert take(worker_indices(0, 1, 3), 3) == [1, 4, 7]  # worker w of W: i ≡ w (mod W)
    blocks = [take(worker_indices(5, w, 2, block=3), 6) for w in range(2)]
    assert blocks == [[5, 6, 7, 11, 12, 13], [8, 9, 10, 14, 15, 16]]
    assert sorted(blocks[0] + blocks[1]) == list(range(5, 17))


def test_loader_with_two_workers_is_ordered_and_resumes_exactly(stores):
    cfg = _cfg(stores)
    full = [b for _, b in zip(range(4), make_loader(cfg, batch_size=2, num_workers=2, seed=1))]
    assert [b["index"].tolist() for b in full] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert full[0]["image"].shape == (2, 1, 16, 16, 16)
    assert all(isinstance(t, str) and t for b in full for t in b["text"] + b["source"])
    resumed = make_loader(cfg, batch_size=2, num_workers=2, seed=1, start_index=4)
    resumed = [b for _, b in zip(range(2), resumed)]
    for a, b in zip(full[2:], resumed):
        assert a["source"] == b["source"] and a["text"] == b["text"] and torch.equal(a["image"], b["image"])
    alone = PatchStream(cfg, seed=1)  # the same samples without workers
    assert torch.equal(full[3]["image"][1], alone.sample(7)["image"])


def test_weighted_choice_follows_weights():
    counts = np.bincount([choose_weighted(sample_rng(0, 0, i), [1.0, 3.0]) for i in range(4000)], minlength=2)
    assert abs(counts[1] / 4000 - 0.75) < 0.03


def test_text_is_one_of_the_entry_descriptions(stores):
    stream = PatchStream(_cfg(stores), seed=0)
    texts = {s["text"] for s in (stream.sample(i) for i in range(30)) if s["source"] == "half"}
    assert texts == {"half bright A", "half bright B", "half bright C"}
    first = PatchStream(_cfg(stores, "text.choice=first"), seed=0)
    assert {s["text"] for s in (first.sample(i) for i in range(30))} == {"half bright A", "small volume"}


def test_foreground_map_rejects_background():
    mask = np.zeros((12, 12, 12), bool)
    mask[..., 6:] = True
    fg = ForegroundMap.from_mask(mask)
    assert fg.fraction((0, 0, 0), (16, 16, 16), (48, 48, 48)) == 0.0
    assert fg.fraction((0, 0, 24), (16, 16, 24), (48, 48, 48)) == 1.0
    assert fg.fraction((0, 0, 16), (16, 16, 16), (48, 48, 48)) == 0.5
    cfg = ForegroundConfig(min_fraction=0.5, max_tries=20)
    def x_starts(fg_map):
        return np.array([choose_position(sample_rng(0, 0, i), (48, 48, 48), (16, 16, 16), fg_map, cfg)[2]
                         for i in range(200)])

    assert x_starts(fg).min() >= 16  # every accepted patch is at least half tissue
    uniform = x_starts(None)
    assert np.mean(np.array(uniform) < 16) > 0.3


def test_foreground_map_bins_large_coarse_levels():
    mask = np.zeros((300, 10, 10), bool)
    mask[150:] = True
    fg = ForegroundMap.from_mask(mask)
    assert fg.counts.shape == (100, 10, 10) and fg.factors == (3, 1, 1)
    assert fg.fraction((0, 0, 0), (150, 10, 10), (300, 10, 10)) == 0.0
    assert fg.fraction((150, 0, 0), (150, 10, 10), (300, 10, 10)) == 1.0


def test_streamed_patches_are_mostly_tissue(stores):
    cfg = _cfg(stores, "foreground.min_fraction=0.6", "foreground.max_tries=20", "augment.enabled=false")
    stream = PatchStream(cfg, seed=0)
    means = [s["image"].mean().item() for s in (stream.sample(i) for i in range(40)) if s["source"] == "half"]
    cfg.foreground.enabled = False
    plain = PatchStream(cfg, seed=0)
    plain_means = [s["image"].mean().item() for s in (plain.sample(i) for i in range(40))
                   if s["source"] == "half"]
    assert np.mean(np.array(means) > 0.1) > 0.9 > np.mean(np.array(plain_means) > 0.1)


def test_store_normalisation_uses_ingest_statistics(stores):
    group, ms = open_image(stores["small"])
    raw = np.asarray(group[ms.paths[0]][0])
    stats = dict(group.attrs)["lsmfm"]["intensity"][0]
    bounds = (stored_percentile(stats, 0.5), stored_percentile(stats, 99.5))
    cfg = _cfg(stores, "patch_size=[16, 24, 24]", "augment.enabled=false", "foreground.enabled=false")
    stream = PatchStream(cfg, seed=0)
    sample = next(s for s in (stream.sample(i) for i in range(20)) if s["source"] == "small")
    expected = percentile_normalize(raw.astype(np.float32), cfg.normalize, bounds)
    np.testing.assert_allclose(sample["image"][0].numpy(), expected, atol=1e-6)
    cfg.normalize = type(cfg.normalize)(source="patch")
    patch = next(s for s in (PatchStream(cfg, seed=0).sample(i) for i in range(20)) if s["source"] == "small")
    own = percentile_normalize(raw.astype(np.float32), cfg.normalize)
    np.testing.assert_allclose(patch["image"][0].numpy(), own, atol=1e-5)


def test_target_voxel_size_picks_level_and_resamples(stores):
    cfg = _cfg(stores, "target_voxel_size=[2, 2, 2]")
    plan = plan_image(stores["half"], 0, cfg)  # voxels (2, 1, 1) µm; level 1 is (2, 2, 2) µm
    assert plan.array_path.endswith("/1") and plan.region == (16, 16, 16) and plan.shape == (48, 24, 24)
    cfg = _cfg(stores, "target_voxel_size=[1, 2, 2]")  # finer than every level along z: level 0
    plan = plan_image(stores["half"], 0, cfg)
    assert plan.array_path.endswith("/0") and plan.region == (8, 32, 32)
    cfg.catalogs = [str(stores["half_catalog"])]
    assert PatchStream(cfg, seed=0).sample(0)["image"].shape == (1, 16, 16, 16)


def test_read_size_and_trilinear_resize_reproduce_the_paper_load_transforms(stores):
    """read_size 24³ -> patch 16³ with per-patch percentiles 1/99 and trilinear resizing is the paper's
    get_load_transforms (ScaleIntensityRangePercentiles on the file's patch, then Resize), by MONAI."""
    from monai.transforms import Compose, Resize, ScaleIntensityRangePercentiles

    cfg = _cfg(stores, "read_size=[24, 24, 24]", "resize=trilinear", "augment.enabled=false",
               "normalize.source=patch", "normalize.lower=1", "normalize.upper=99")
    cfg.catalogs = [str(stores["half_catalog"])]
    stream = PatchStream(cfg, seed=0)
    draw = stream.locate(3)
    assert draw.image.region == (24, 24, 24)
    z, y, x = draw.start
    group, ms = open_image(stores["half"])
    region = np.asarray(group[ms.paths[0]][0, z:z + 24, y:y + 24, x:x + 24], dtype=np.float32)
    paper = Compose([ScaleIntensityRangePercentiles(lower=1.0, upper=99.0, b_min=0.0, b_max=1.0, clip=True),
                     Resize(spatial_size=(16, 16, 16), mode="trilinear", align_corners=False)])
    expected = torch.as_tensor(paper(torch.from_numpy(region)[None])).float()
    assert torch.allclose(stream.sample(3)["image"], expected, atol=1e-5)
    cfg.resize = "area"
    area = PatchStream(cfg, seed=0).sample(3)["image"]
    assert area.shape == (1, 16, 16, 16) and not torch.allclose(area, expected, atol=1e-3)
    with pytest.raises(ConfigError, match="read_size or target_voxel_size"):
        _cfg(stores, "read_size=[24, 24, 24]", "target_voxel_size=[2, 2, 2]")


def test_bad_input_is_refused_before_streaming(stores, tmp_path):
    with pytest.raises(InputError, match=r"half.zarr.*patch region \[64, 64, 64\].*volume \[48, 48, 48\]"):
        PatchStream(_cfg(stores, "patch_size=[64, 64, 64]"))
    with pytest.raises(InputError, match="lists no catalogs"):
        PatchStream(StreamConfig())
    empty = tmp_path / "empty.yaml"
    empty.write_text("entries: []\n")
    with pytest.raises(LsmfmError, match="empty.yaml"):
        PatchStream(StreamConfig(catalogs=[str(empty)]))
    missing = write_catalog(tmp_path / "missing.yaml",
                            [{"id": "m", "store": "nope.zarr", "descriptions": ["t"]}])
    with pytest.raises(InputError, match="nope.zarr.*store is missing"):
        PatchStream(StreamConfig(catalogs=[str(missing)]))
    import zarr

    unfinished = zarr.open_group(str(tmp_path / "unfinished.zarr"), mode="w")
    unfinished.create_array("0", shape=(1, 8, 8, 8), dtype="u2")
    with pytest.raises(InputError, match="unfinished.zarr"):
        plan_image(tmp_path / "unfinished.zarr", 0, _cfg(stores))
    with pytest.raises(ConfigError, match="rot90_prob"):
        load_config(StreamConfig, None, ["patch_size=[16, 16, 32]"])


def test_store_without_statistics_needs_patch_normalisation(stores, tmp_path):
    import zarr

    from lsmfm.io.omezarr import multiscales_metadata, write_ome

    group = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    group.create_array("0", shape=(1, 32, 32, 32), dtype="u2")[:] = _half_bright((32, 32, 32))[None]
    write_ome(group, {"multiscales": [multiscales_metadata("plain", (1.0, 1.0, 1.0), [], "mean")]})
    catalog = write_catalog(tmp_path / "plain.yaml",
                            [{"id": "p", "store": "plain.zarr", "descriptions": ["t"]}])
    cfg = StreamConfig(catalogs=[str(catalog)], patch_size=[16, 16, 16])
    with pytest.raises(InputError, match="plain.zarr: no intensity statistics"):
        PatchStream(cfg)
    cfg.normalize = type(cfg.normalize)(source="patch")
    image = PatchStream(cfg, seed=0).sample(0)["image"]
    assert image.shape == (1, 16, 16, 16) and 0.0 <= image.min() and image.max() <= 1.0


def test_report_and_cli(stores, capsys, tmp_path):
    report = stream_report(_cfg(stores), n_batches=3, batch_size=2, num_workers=0, seed=0, progress=False)
    assert sum(r["count"] for r in report["sources"].values()) == 6 == report["patches"]
    assert set(report["sources"]) <= {"half", "small"} and report["patches_per_s"] > 0
    assert all(0 <= r["foreground_fraction"] <= 1 for r in report["sources"].values())
    out = tmp_path / "report.json"
    rc = main(["stream", "--catalog", str(stores["catalog"]), "--patch", "16", "--batch", "2",
               "--workers", "0", "--n", "2", "--json", str(out), "augment.noise_prob=0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "patches/s" in text and "mean intensity" in text
    assert json.loads(out.read_text())["patches"] == 4
    assert main(["stream", "--catalog", str(stores["catalog"]), "--patch", "64", "--workers", "0"]) == 1


@pytest.mark.shared
def test_real_data_streams_with_text(shared_data, tmp_path):
    from lsmfm.data.catalog.materialize import ingest_catalog
    from lsmfm.data.catalog.paper import paper_entries

    pretrain = shared_data / "lsm_fm_samples" / "pretrain"
    catalog_path = tmp_path / "real.yaml"
    paper = paper_entries(pretrain / "wu_brain_patches", pretrain / "text_prompts_wu.json",
                          tmp_path / "stores", catalog_path)[:3]
    meso = shared_data / "mesospim_nuclei_unlabelled"
    text = "mesoSPIM light-sheet volume of cleared mouse brain with stained cell nuclei."
    mesospim = [{"id": f"mesospim_{name}", "store": f"stores/mesospim_{name}.zarr",
                 "source": str(meso / f"{name}.tif"), "descriptions": [text]}
                for name in ("c5image", "very_small")]
    write_catalog(catalog_path, paper + mesospim)
    ingest_catalog(catalog_path, progress=False)
    prompts = {e["id"]: e["descriptions"][0] for e in paper + mesospim}
    cfg = StreamConfig(catalogs=[str(catalog_path)], patch_size=[32, 32, 32])
    batches = [b for _, b in zip(range(6), make_loader(cfg, batch_size=4, num_workers=2, seed=0))]
    seen = set()
    for batch in batches:
        assert batch["image"].shape == (4, 1, 32, 32, 32) and torch.isfinite(batch["image"]).all()
        for source, text in zip(batch["source"], batch["text"]):
            assert text == prompts[source]
            seen.add(source)
    assert len(seen) >= 4  # 24 draws over 5 equally weighted sources


@pytest.mark.parametrize("fault", ["deleted", "corrupt"])
def test_a_lost_or_corrupt_chunk_stops_the_stream_naming_its_file(tmp_path, capsys, fault):
    """Not fill values, not 'error during blosc decompression': the chunk's path, in one line, also from
    DataLoader workers and the CLI."""
    store = ingest_array(_half_bright(), (2.0, 1.0, 1.0), tmp_path / "s.zarr", chunk=16, shard=1,
                         progress=False)
    catalog = write_catalog(tmp_path / "c.yaml", [{"id": "s", "store": "s.zarr", "descriptions": ["t"]}])
    chunks = sorted((store / "0" / "c").rglob("*"))
    files = [p for p in chunks if p.is_file()]
    assert len(files) == 27  # 48³ in 16³ chunks: every chunk stored
    if fault == "deleted":
        for f in files:
            f.unlink()
    else:
        for f in files:
            f.write_bytes(b"\0" * len(f.read_bytes()))
    expected = "missing chunk: every chunk of this array was written" if fault == "deleted" else \
        "corrupt chunk: cannot decompress"
    cfg = StreamConfig(catalogs=[str(catalog)], patch_size=[16, 16, 16])
    with pytest.raises(InputError, match=f"{store / '0' / 'c'}/0/\\d+/\\d+/\\d+: {expected}"):
        next(iter(make_loader(cfg, batch_size=2, num_workers=2)))
    assert main(["stream", "--catalog", str(catalog), "--patch", "16", "--workers", "1", "--n", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.splitlines()[-1].startswith("lsmfm stream: error: ")
    assert expected in err.splitlines()[-1] and str(store / "0" / "c") in err
