"""OME-Zarr ingest: exact pyramid and statistics, channels, labels, bad input, interruption, memory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
import zarr

from lsmfm.cli.main import main
from lsmfm.data.catalog.entries import load_catalog, validate_catalog, write_catalog
from lsmfm.data.ingest.convert import ingest, ingest_array, pyramid_factors
from lsmfm.data.synthetic.write import write_nifti, write_tiff
from lsmfm.errors import InputError, LsmfmWarning
from lsmfm.io.omezarr import is_complete_image, open_image, stored_percentile

REPO = Path(__file__).resolve().parents[1]
VOXEL = (4.0, 1.8, 1.8)


def _volume(shape=(40, 140, 130), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3000, shape).astype(np.uint16)


@pytest.fixture(scope="module")
def tiff_pair(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    folder = tmp_path_factory.mktemp("src")
    vol = _volume()
    write_tiff(folder / "img.tif", vol, VOXEL)
    write_tiff(folder / "lab.tif", (vol > 2900).astype(np.uint8), VOXEL)
    return folder / "img.tif", folder / "lab.tif", vol


def test_pyramid_factors_make_voxels_isotropic_first():
    assert pyramid_factors((128, 128, 128), (4.0, 1.8, 1.8)) == [(1, 2, 2), (2, 2, 2)]
    assert pyramid_factors((96, 96, 96), (2.0, 1.866, 1.866)) == [(2, 2, 2)]
    assert pyramid_factors((32, 32, 32), (1, 1, 1)) == [(2, 2, 2)], "at least two levels"
    assert len(pyramid_factors((512, 512, 512), (1, 1, 1))) == 3
    assert len(pyramid_factors((96, 96, 96), (1, 1, 1), levels=4)) == 3
    with pytest.raises(InputError, match="levels must be >= 2"):
        pyramid_factors((96, 96, 96), (1, 1, 1), levels=1)


def test_ingest_round_trip_pyramid_labels_and_stats(tiff_pair, tmp_path):
    src, lab, vol = tiff_pair
    out = ingest(src, tmp_path / "a.zarr", labels={"bright": lab}, progress=False)
    group, ms = open_image(out)
    assert ms.version == "0.5" and ms.axes == ["c", "z", "y", "x"] and ms.paths == ["0", "1", "2"]
    assert ms.voxel_sizes == [(4.0, 1.8, 1.8), (4.0, 3.6, 3.6), (8.0, 7.2, 7.2)]
    assert np.array_equal(group["0"][0], vol)
    mean_pooled = np.rint(vol.reshape(40, 70, 2, 65, 2).mean(axis=(2, 4)))
    assert np.array_equal(group["1"][0], mean_pooled)
    label = (vol > 2900).reshape(40, 70, 2, 65, 2).max(axis=(2, 4))
    assert np.array_equal(group["labels/bright/1"][0], label)
    assert group["labels"].attrs["ome"]["labels"] == ["bright"]
    meta = json.loads((out / "0" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 40, 192, 192]  # one shard, capped
    sharding = meta["codecs"][0]
    assert sharding["name"] == "sharding_indexed"
    assert sharding["configuration"]["chunk_shape"] == [1, 40, 64, 64]
    blosc = [c for c in sharding["configuration"]["codecs"] if c["name"] == "blosc"][0]["configuration"]
    assert blosc["cname"] == "zstd"
    assert meta["attributes"]["lsmfm"]["every_chunk_written"] is True
    assert sorted(str(p.relative_to(out / "0")) for p in (out / "0").rglob("*") if p.is_file()) == \
        ["c/0/0/0/0", "zarr.json"]
    stats = group.attrs["lsmfm"]["intensity"][0]
    assert stats["percentiles"]["0.5"] == pytest.approx(np.percentile(vol, 0.5))
    assert stored_percentile(stats, 99.5) == pytest.approx(np.percentile(vol, 99.5))
    assert stats["min"] == vol.min() and stats["max"] == vol.max()
    assert stats["mean"] == pytest.approx(vol.mean()) and stats["std"] == pytest.approx(vol.std())
    assert not (tmp_path / "a.zarr.partial").exists()


def test_several_sources_are_channels(tmp_path):
    a, b = _volume((30, 40, 50), 1), _volume((30, 40, 50), 2)
    write_nifti(tmp_path / "a.nii.gz", a, VOXEL)
    write_nifti(tmp_path / "b.nii.gz", b, VOXEL)
    group, ms = open_image(ingest([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], tmp_path / "ab.zarr",
                                  progress=False))
    assert group["0"].shape == (2, 30, 40, 50) and np.array_equal(group["0"][1], b)
    assert ms.voxel_sizes[0] == pytest.approx(VOXEL)
    assert [s["max"] for s in group.attrs["lsmfm"]["intensity"]] == [a.max(), b.max()]
    write_nifti(tmp_path / "c.nii.gz", _volume((30, 40, 51)), VOXEL)
    with pytest.raises(InputError, match=r"c\.nii\.gz.*differs from .*a\.nii\.gz"):
        ingest([tmp_path / "a.nii.gz", tmp_path / "c.nii.gz"], tmp_path / "ac.zarr", progress=False)


def test_cli_ingest_and_rerun_policy(tiff_pair, tmp_path, capsys):
    src, lab, _ = tiff_pair
    out = tmp_path / "cli.zarr"
    assert main(["ingest", str(src), "--out", str(out), "--label", f"bright={lab}", "--quiet"]) == 0
    assert "voxel (z, y, x) 4x1.8x1.8 µm" in capsys.readouterr().out
    assert main(["ingest", str(src), "--out", str(out), "--quiet"]) == 1
    assert "already a complete OME-Zarr image" in capsys.readouterr().err
    assert main(["ingest", str(src), "--out", str(out), "--quiet", "--overwrite"]) == 0
    assert "labels" not in zarr.open_group(str(out), mode="r"), "overwrite replaces the whole store"


def _bad_inputs(folder: Path) -> dict[str, tuple[list[Path], dict, str]]:
    """name -> (sources, labels, expected message fragment)."""
    vol = _volume((20, 30, 40))
    write_tiff(folder / "ok.tif", vol, VOXEL)
    tifffile.imwrite(folder / "plane.tif", vol[0])
    write_tiff(folder / "constant.tif", np.full((20, 30, 40), 7, np.uint16), VOXEL)
    nan = vol.astype(np.float32)
    nan[3, 4, 5] = np.nan
    write_nifti(folder / "nan.nii.gz", nan, VOXEL)
    write_nifti(folder / "truncated.nii.gz", vol, VOXEL)
    data = (folder / "truncated.nii.gz").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    write_nifti(folder / "zeroed.nii.gz", vol, VOXEL)
    data = bytearray((folder / "zeroed.nii.gz").read_bytes())
    middle = len(data) // 2
    data[middle - 1000:middle + 1000] = bytes(2000)  # 2,000 bytes zeroed mid-stream
    (folder / "zeroed.nii.gz").write_bytes(bytes(data))
    nib.save(nib.Nifti1Image(vol.T, np.eye(4)), str(folder / "short.nii"))
    data = (folder / "short.nii").read_bytes()
    (folder / "short.nii").write_bytes(data[:-100])
    for name, writer in [("short_imagej.tif", lambda p: write_tiff(p, vol, VOXEL)),
                         ("short_pages.tif", lambda p: tifffile.imwrite(p, vol))]:
        writer(folder / name)
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) * 2 // 3])
    (folder / "garbage.tif").write_text("not a tiff")
    write_tiff(folder / "small_label.tif", np.zeros((20, 30, 39), np.uint8), VOXEL)
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4, 2, 2), np.float32), np.eye(4)), str(folder / "five_d.nii.gz"))
    ok = folder / "ok.tif"
    return {
        "missing": ([folder / "nope.tif"], {}, "no such file"),
        "2d": ([folder / "plane.tif"], {}, "no Z axis"),
        "constant": ([folder / "constant.tif"], {}, "constant volume"),
        "nan": ([folder / "nan.nii.gz"], {}, "NaN/Inf"),
        "truncated": ([folder / "truncated.nii.gz"], {}, "truncated gzip stream"),
        "zeroed": ([folder / "zeroed.nii.gz"], {}, "corrupt or truncated gzip stream"),
        "short_nii": ([folder / "short.nii"], {}, "truncated NIfTI: the header needs 48352 bytes, the file "
                                                  "has 48252"),
        "short_imagej_tif": ([folder / "short_imagej.tif"], {}, "truncated (or corrupt )?TIFF"),
        "short_pages_tif": ([folder / "short_pages.tif"], {}, "truncated (or corrupt )?TIFF"),
        "garbage": ([folder / "garbage.tif"], {}, "cannot read tiff"),
        "label_shape": ([ok], {"x": folder / "small_label.tif"}, "label shape"),
        "five_d": ([folder / "five_d.nii.gz"], {}, "expected a 3D NIfTI"),
    }


@pytest.mark.parametrize("case", ["missing", "2d", "constant", "nan", "truncated", "zeroed", "short_nii",
                                  "short_imagej_tif", "short_pages_tif", "garbage", "label_shape", "five_d"])
def test_bad_input_names_the_file_and_leaves_nothing(case, tmp_path):
    sources, labels, fragment = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "x.zarr"
    with pytest.raises(InputError, match=fragment) as err:
        ingest(sources, out, labels=labels, progress=False)
    named = list(labels.values())[0] if labels else sources[0]
    assert named.name in str(err.value)
    assert not out.exists() and not out.with_name("x.zarr.partial").exists()


@pytest.mark.parametrize("array, voxel, fragment", [
    (np.zeros((0, 8, 8), np.uint16), (1, 1, 1), "volume is empty"),
    (np.ones((8, 8), np.uint16), (1, 1, 1), "expected a 3D volume"),
    (np.ones((8, 1, 8), np.uint16), (1, 1, 1), "spatial side of length 1"),
    (np.arange(512, dtype=np.uint16).reshape(8, 8, 8), (1, 0, 1), "voxel size must be 3 positive"),
    (np.ones((8, 8, 8), complex), (1, 1, 1), "unsupported data type"),
])
def test_ingest_array_rejects_bad_arrays(array, voxel, fragment, tmp_path):
    with pytest.raises(InputError, match=fragment):
        ingest_array(array, voxel, tmp_path / "x.zarr", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_failure_midway_leaves_no_store(tiff_pair, tmp_path, monkeypatch):
    from lsmfm.data.ingest import pyramid

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pyramid, "write_pyramid", boom)
    with pytest.raises(KeyboardInterrupt):
        ingest(tiff_pair[0], tmp_path / "x.zarr", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_ingest_never_looks_complete_and_rerun_finishes(tmp_path):
    out = tmp_path / "k.zarr"
    script = textwrap.dedent(f"""
        import time, numpy as np, dask.array as da
        from lsmfm.data.ingest.convert import ingest_array
        def slow(block):
            time.sleep(0.05)
            return block + 1
        x = da.zeros((128, 128, 128), chunks=16, dtype=np.uint16).map_blocks(slow)
        x = x + da.arange(128, chunks=16, dtype=np.uint16)
        ingest_array(x, (1, 1, 1), {str(out)!r}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO)
    partial = tmp_path / "k.zarr.partial"
    deadline = time.time() + 60
    while not (partial / "0").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert partial.exists() and not out.exists()
    assert not is_complete_image(partial)
    write_tiff(tmp_path / "small.tif", _volume((20, 30, 40)), VOXEL)
    with pytest.warns(LsmfmWarning, match="took over the stale lock of lsmfm ingest"):
        rerun = ingest(tmp_path / "small.tif", out, progress=False)
    assert is_complete_image(rerun) and not partial.exists()


BOUNDED = """
import resource, sys
import numpy as np, dask.array as da
from lsmfm.data.ingest.convert import ingest_array

def pattern(block_info=None):
    (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
    z, y, x = np.ogrid[z0:z1, y0:y1, x0:x1]
    return ((z * 3 + y * 5 + x * 7) % 1000).astype(np.uint16)

def lazy(n):
    return da.map_blocks(pattern, chunks=((64,) * (n // 64),) * 3, dtype=np.uint16)

def vm_bytes():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))

ingest_array(lazy(256), (1, 1, 1), sys.argv[1] + "/warm.zarr", progress=False, shard=2)  # threads, codecs
limit = vm_bytes() + 128 * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
big = lazy(512)
try:
    np.ones(big.shape, big.dtype)
    raise SystemExit("the limit is too loose: the whole volume fits")
except MemoryError:
    pass
ingest_array(big, (2.0, 1.0, 1.0), sys.argv[1] + "/big.zarr", progress=False, shard=2)
print("ok", big.nbytes)
"""


def test_larger_than_memory_volume_converts(tmp_path):
    """A 256 MiB lazy volume ingests with address space limited to 128 MiB over the warmed-up process:
    memory follows the shard (here 128³ voxels, 4 MiB), not the volume."""
    result = subprocess.run([sys.executable, "-c", BOUNDED, str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", str(512 ** 3 * 2)]
    group, ms = open_image(tmp_path / "big.zarr")
    assert [group[p].shape for p in ms.paths] == [(1, 512, 512, 512), (1, 512, 256, 256), (1, 256, 128, 128),
                                                   (1, 128, 64, 64), (1, 64, 32, 32)]
    z, y, x = 300, 17, 511
    assert group["0"][0, z, y, x] == (z * 3 + y * 5 + x * 7) % 1000


@pytest.mark.shared
def test_real_data_ingests_and_catalogs(shared_data, tmp_path):
    patches = shared_data / "lsm_fm_samples" / "pretrain" / "wu_brain_patches"
    pretrain = sorted(patches.glob("*/input/*.nii.gz"))
    mesospim = sorted((shared_data / "mesospim_nuclei_unlabelled").glob("*.tif"))
    entries, expected = [], {}
    for src in pretrain[:3] + mesospim:
        name = src.name.split(".")[0]
        out = ingest(src, tmp_path / "stores" / f"{name}.zarr", progress=False)
        group, ms = open_image(out)
        expected[name] = (group["0"].shape[1:], ms.voxel_sizes[0])
        assert len(ms.paths) >= 2
        entries.append({"id": name, "store": f"stores/{name}.zarr", "descriptions": [f"real volume {name}"]})
    for name, (shape, voxel) in expected.items():
        if name in ("c5image", "very_small"):
            assert shape == {"c5image": (124, 86, 94), "very_small": (64, 64, 64)}[name]
            assert voxel == (1.0, 1.0, 1.0)
        else:
            assert shape == (96, 96, 96)
            assert voxel[0] == pytest.approx(2.0) and voxel[1] == voxel[2] and 1.79 < voxel[1] < 1.87
    catalog = write_catalog(tmp_path / "real.yaml", entries)
    assert len(load_catalog(catalog)) == 5
    assert [r["status"] for r in validate_catalog(catalog)] == ["ok"] * 5


def test_two_ingests_at_once_one_writes_the_other_is_refused(tmp_path):
    """Both start together: exactly one writes the store; the other is refused in one line (the lock, or
    the finished store when it came second), and the store is complete and exact."""
    vol = _volume((64, 96, 96))
    write_tiff(tmp_path / "img.tif", vol, VOXEL)
    out = tmp_path / "same.zarr"
    cmd = [sys.executable, "-m", "lsmfm.cli.main", "ingest", str(tmp_path / "img.tif"), "--out", str(out),
           "--quiet"]
    procs = [subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 1], results
    refusal = next(err for rc, err in results if rc)
    assert len(refusal.strip().splitlines()) == 1
    assert "in use by lsmfm ingest (pid" in refusal or "already a complete OME-Zarr image" in refusal
    group, ms = open_image(out)
    np.testing.assert_array_equal(group["0"][0], vol)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["img.tif", "same.zarr"]


def test_ingest_refuses_while_another_writer_holds_the_output(tiff_pair, tmp_path, capsys):
    from lsmfm.io.lock import output_lock

    out = tmp_path / "busy.zarr"
    with output_lock(out, "lsmfm ingest"):
        assert main(["ingest", str(tiff_pair[0]), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"busy.zarr: in use by lsmfm ingest (pid {os.getpid()}" in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "busy.zarr.partial").exists()


def _ome_zarr_py_store(path: Path, vol: np.ndarray) -> Path:
    """An NGFF 0.5 image written by ome-zarr-py itself (zarr's defaults: empty chunks are not stored)."""
    from ome_zarr.writer import write_image

    write_image(vol[None], zarr.open_group(str(path), mode="w"), axes="czyx",
                storage_options={"chunks": (1, 16, 16, 16)})
    return path


def test_foreign_ome_zarr_empty_chunks_ingest_and_a_lost_chunk_is_named(tmp_path):
    rng = np.random.default_rng(3)
    vol = rng.integers(1, 3000, (32, 64, 64)).astype(np.uint16)
    vol[:, :32, :32] = 0  # four legitimately empty (unstored) chunks per z slab
    src = _ome_zarr_py_store(tmp_path / "src.zarr", vol)
    level0 = src / "s0"
    stored = sorted(p for p in (level0 / "c").rglob("*") if p.is_file())
    assert len(stored) == 2 * 4 * 4 - 2 * 2 * 2  # the empty ones are absent
    group, _ = open_image(ingest(src, tmp_path / "ok.zarr", progress=False))
    np.testing.assert_array_equal(group["0"][0], vol)
    lost = level0 / "c/0/1/3/3"
    lost.unlink()
    with pytest.raises(InputError, match=f"{lost}: missing chunk: the coarser level 's1' holds data"):
        ingest(src, tmp_path / "bad.zarr", progress=False)
    assert not (tmp_path / "bad.zarr").exists() and not (tmp_path / "bad.zarr.partial").exists()


def test_a_lost_chunk_of_an_lsmfm_store_used_as_a_source_is_named(tiff_pair, tmp_path):
    first = ingest(tiff_pair[0], tmp_path / "first.zarr", progress=False, shard=1)
    lost = first / "0/c/0/0/1/1"
    lost.unlink()
    with pytest.raises(InputError, match=f"{lost}: missing chunk: every chunk of this array was written"):
        ingest(first, tmp_path / "second.zarr", progress=False)


def test_a_full_disk_names_the_output_not_the_source(tiff_pair, tmp_path, monkeypatch, capsys):
    import errno

    from zarr.storage import LocalStore

    async def full(self, key, value, *args, **kwargs):
        if key.startswith("c/") or "/c/" in key:
            raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, key, value, *args, **kwargs)

    real = LocalStore.set
    monkeypatch.setattr(LocalStore, "set", full)
    out = tmp_path / "full.zarr"
    assert main(["ingest", str(tiff_pair[0]), "--out", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"{out}: cannot write: No space left on device (" in err and "GiB free" in err
    assert str(tiff_pair[0]) not in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _tree(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def test_ingest_on_a_dask_cluster_writes_the_local_store(tiff_pair, tmp_path, capsys):
    """A LocalCluster of 2 worker processes (what --dask-address does with a remote one): every file of
    the store is the same as with local threads, byte for byte, also the zero-only chunks."""
    src, lab, vol = tiff_pair
    local = ingest(src, tmp_path / "local.zarr", labels={"bright": lab}, progress=False, shard=2)
    args = ["ingest", str(src), "--out", str(tmp_path / "cluster.zarr"), "--label", f"bright={lab}",
            "--shard", "2", "--workers", "2", "--quiet"]
    assert main(args) == 0
    assert _tree(tmp_path / "cluster.zarr") == _tree(local)
    assert len([k for k in _tree(local) if "/c/" in k]) > 10


def test_slurm_cluster_recipe_builds_its_worker_jobs(tmp_path):
    """slurm/ingest_cluster.py: the SLURMCluster's worker job script (nothing is submitted before scale)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("ingest_cluster", REPO / "slurm" / "ingest_cluster.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    args, rest = recipe.parse(["--cores", "8", "--memory", "32GB", "--partition", "cpu", "--logs",
                               str(tmp_path), "--", "brain.tif", "--out", "brain.zarr"])
    assert rest == ["brain.tif", "--out", "brain.zarr"]
    with recipe.make_cluster(args) as cluster:
        script = cluster.job_script()
    assert "#SBATCH -p cpu" in script and "#SBATCH --mem=30G" in script
    assert "--nworkers 8" in script and "--nthreads 1" in script
    with pytest.raises(SystemExit, match="usage"):
        recipe.parse(["brain.tif"])
