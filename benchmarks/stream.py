"""Patches per second: lsmfm streaming from OME-Zarr vs the paper code's NIfTI reads vs raw chunk decoding.

    .venv/bin/python benchmarks/stream.py --json runs/bench_stream.json [--n 80] [--data auto|real|synthetic]

On the same data and cores, one process with one torch thread (as in DataLoader workers); the pipelines
take turns patch by patch for 5 rounds and patches/s = 1 / median time per patch (robust to bursts of load
from other jobs on a shared machine; the DataLoader row runs alone after them: its best round):
  (a) lsmfm: `PatchStream.sample` of 96³ patches from OME-Zarr (store-statistics normalisation, foreground
      sampling on; augmentation off, as the baseline has none; rows with augmentation, with resampling to
      64³ like the baseline, and through `make_loader` with worker processes are reported too);
  (b) the paper code's path: one 96³ gzipped NIfTI patch per sample read with nibabel, then MONAI
      ScaleIntensityRangePercentiles (0.5-99.5 %) and Resize to 64³;
  (c) the ceiling: blosc decoding of the chunk bytes (already in memory, into a reused buffer) that cover
      the same patches as (a): the decompression (a) cannot avoid, and nothing else.
Both store layouts are measured (`--layout both`): sharded (lsmfm's default, 4³ chunks of 64³ per file,
read through the shard index) and plain (one file per chunk).
Data: the real pretraining patches of ../shared/data/lsm_fm_samples/pretrain (each a 96³ volume, so a 96³
patch is the whole image) when present, else synthetic 192³ volumes with 96³ NIfTI patches cut from them;
`--data both` also runs the synthetic set, whose random patch positions cross chunk borders.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PAPER = SHARED / "lsm_fm_samples" / "pretrain"
sys.path.insert(0, str(REPO))


@dataclass
class BenchData:
    kind: str
    description: str
    catalog: Path
    niftis: list[Path]


LAYOUTS = {"sharded": 4, "plain": 1}  # chunks per shard side: lsmfm's default, and one file per chunk


def prepare_real(work: Path, layout: str) -> BenchData:
    """Ingest the 10 real pretraining patches (catalog with their text prompts) via the paper importer."""
    from lsmfm.data.catalog.paper import import_paper

    catalog = work / f"real_{layout}" / "catalog.yaml"
    if not catalog.exists():
        import_paper(PAPER / "wu_brain_patches", PAPER / "text_prompts_wu.json",
                     work / f"real_{layout}" / "stores", catalog, progress=False, shard=LAYOUTS[layout])
    niftis = sorted(PAPER.glob("wu_brain_patches/*/input/*.nii.gz"))
    return BenchData("real", f"{len(niftis)} real 96³ uint16 patches of lsm_fm_samples/pretrain (gzipped "
                             f"NIfTI) and their OME-Zarr stores ({layout})", catalog, niftis)


def prepare_synthetic(work: Path, layout: str, size: int = 192, patches_per_volume: int = 5) -> BenchData:
    """Two synthetic volumes ingested to OME-Zarr, and 96³ gzipped NIfTI patches cut from them."""
    from lsmfm.data.catalog.entries import write_catalog
    from lsmfm.data.ingest.convert import ingest_array
    from lsmfm.data.synthetic.volume import generate_volume, preset_config
    from lsmfm.data.synthetic.write import write_nifti

    root = work / "synthetic"
    catalog = root / f"catalog_{layout}.yaml"
    niftis = sorted(root.glob("nifti/*.nii.gz"))
    if not catalog.exists():
        (root / "nifti").mkdir(parents=True, exist_ok=True)
        entries = []
        for i, structure in enumerate(("cell_nucleus", "vessels")):
            vol = generate_volume(preset_config(structure, (size,) * 3, seed=i))
            ingest_array(vol.image, vol.voxel_size, root / f"{structure}_{layout}.zarr", progress=False,
                         overwrite=True, shard=LAYOUTS[layout])
            entries.append({"id": structure, "store": f"{structure}_{layout}.zarr",
                            "descriptions": [f"synthetic {structure}"]})
            rng = np.random.default_rng(i)
            for k in range(patches_per_volume):
                z, y, x = rng.integers(0, size - 96, 3)
                patch = vol.image[z:z + 96, y:y + 96, x:x + 96]
                write_nifti(root / "nifti" / f"{structure}_{k}.nii.gz", patch, vol.voxel_size)
        write_catalog(catalog, entries)
        niftis = sorted(root.glob("nifti/*.nii.gz"))
    return BenchData("synthetic", f"2 synthetic {size}³ uint16 volumes (OME-Zarr, {layout}) and {len(niftis)} "
                                  "96³ gzipped NIfTI patches cut from them", catalog, niftis)


def stream_config(catalog: Path, augment: bool = False, target: list[float] | None = None):
    """96³ patches, or with `target` (µm) 64³ patches resampled from the region that covers."""
    from lsmfm.config import load_config
    from lsmfm.data.stream.config import StreamConfig

    patch = 96 if target is None else 64
    cfg = load_config(StreamConfig, None, [f"augment.enabled={str(augment).lower()}",
                                           f"patch_size=[{patch}, {patch}, {patch}]"])
    cfg.catalogs, cfg.target_voxel_size = [str(catalog)], target
    return cfg


@dataclass
class Pipeline:
    """fn(i) produces `per_call` patches for sample index i; timed over `calls` indices after `warmup`.
    `steady`: fn does the same work every call, so the median call time is its cost; a DataLoader
    (prefetching, so some calls return at once) is rated by the throughput of its best round instead."""

    name: str
    fn: Callable[[int], object]
    calls: int
    warmup: int
    per_call: int = 1
    steady: bool = True


def measure(pipelines: list[Pipeline], rounds: int = 5) -> dict[str, float]:
    """Patches/s of each pipeline. Steady pipelines take turns call by call (same caches, same background
    load: no pipeline runs alone in a tight loop or alone through a burst of load from other jobs on this
    shared machine) and are rated by their median call; a DataLoader runs alone afterwards (its workers
    would compete with the others), rated by its best round."""
    for p in pipelines:
        for i in range(p.warmup):
            p.fn(i)
    steady = [p for p in pipelines if p.steady]
    times: dict[str, list[float]] = {p.name: [] for p in steady}
    for _ in range(rounds):
        for k in range(max(p.calls for p in steady)):
            for p in (p for p in steady if k < p.calls):
                start = time.perf_counter()
                p.fn(p.warmup + k)
                times[p.name].append(time.perf_counter() - start)
    rates = {p.name: p.per_call / float(np.median(times[p.name])) for p in steady}
    for p in (p for p in pipelines if not p.steady):
        best = 0.0
        for _ in range(rounds):
            start = time.perf_counter()
            for i in range(p.warmup, p.warmup + p.calls):
                p.fn(i)
            best = max(best, p.calls * p.per_call / (time.perf_counter() - start))
        rates[p.name] = best
    return rates


def lsmfm_sample(cfg) -> Callable[[int], object]:
    from lsmfm.data.stream.dataset import PatchStream

    return PatchStream(cfg, seed=0).sample


def lsmfm_loader(cfg, workers: int, batch: int) -> Callable[[int], object]:
    from lsmfm.data.stream.dataset import make_loader

    batches = iter(make_loader(cfg, batch, num_workers=workers, seed=0))
    return lambda i: next(batches)


def nifti_sample(files: list[Path], transforms: bool = True) -> Callable[[int], object]:
    """The paper code's per-sample path: a whole NIfTI patch, percentile scaling, resize to 64³
    (`transforms=False`: the NIfTI read alone, a bound no per-sample NIfTI pipeline can beat)."""
    import nibabel as nib
    import torch
    from monai.data import set_track_meta
    from monai.transforms import Resize, ScaleIntensityRangePercentiles

    set_track_meta(False)  # plain tensors: the fastest MONAI path, so the baseline is not handicapped
    scale = ScaleIntensityRangePercentiles(lower=0.5, upper=99.5, b_min=0.0, b_max=1.0, clip=True)
    resize = Resize((64, 64, 64))

    def one(i: int) -> torch.Tensor:
        arr = np.asarray(nib.load(str(files[i % len(files)])).dataobj, dtype=np.float32)
        x = torch.from_numpy(arr.reshape(arr.shape[:3]))[None]
        return resize(scale(x)) if transforms else x

    return one


def chunk_payloads(image, start: tuple[int, ...]) -> tuple[object, list[bytes]]:
    """(layout, the compressed bytes of every stored chunk a patch region touches): chunk files, or the
    inner chunks of shards, located through the shard index as lsmfm's reader does."""
    from itertools import product

    from lsmfm.io.chunk_reader import ChunkReader, open_reader
    from lsmfm.io.chunks import ShardIndex

    reader = open_reader(image.array_path)
    if not isinstance(reader, ChunkReader) or reader.layout.compressor != "blosc":
        raise SystemExit(f"{image.array_path}: the decode ceiling expects lsmfm's blosc chunks")
    layout = reader.layout
    index = image.index(tuple(slice(s, s + r) for s, r in zip(start, image.region)))
    bounds = [(i, i + 1) if isinstance(i, int) else (i.start, i.stop) for i in index]
    payloads = []
    for key in product(*(range(lo // c, (hi - 1) // c + 1) for (lo, hi), c in zip(bounds, layout.chunks))):
        if not layout.sharded:
            payloads.append(layout.object_path(key).read_bytes())
            continue
        shard = tuple(k // p for k, p in zip(key, layout.per_object))
        inner = tuple(k % p for k, p in zip(key, layout.per_object))
        with open(layout.object_path(shard), "rb") as fh:
            entry = ShardIndex(layout, layout.object_path(shard), fh.fileno()).entry(inner)
            payloads.append(os.pread(fh.fileno(), entry[1], entry[0]))
    return layout, payloads


def decode_ceiling(cfg, indices: int) -> tuple[Callable[[int], object], float, float]:
    """Blosc decoding of the chunk bytes covering the same patches as (a), into a reused buffer: the
    decompression work of (a) and nothing else. Returns (fn, chunks per patch, compressed MB per patch)."""
    from lsmfm.data.stream.dataset import PatchStream
    from lsmfm.io.chunks import ChunkDecoder

    stream = PatchStream(cfg, seed=0)
    decoders, payloads = {}, []
    for i in range(indices):
        draw = stream.locate(i)
        layout, chunks = chunk_payloads(draw.image, draw.start)
        decoder = decoders.setdefault(draw.image.array_path, ChunkDecoder(layout))
        payloads.append([(decoder, data) for data in chunks])

    def decode(i: int) -> None:
        for decoder, data in payloads[i]:
            decoder.codec.decode(data, out=decoder.buffer)

    sizes = [sum(len(d) for _, d in p) for p in payloads]
    return decode, float(np.mean([len(p) for p in payloads])), float(np.mean(sizes) / 1e6)


def voxel_sizes(catalog: Path) -> list[tuple[float, float, float]]:
    from lsmfm.data.catalog.entries import load_catalog
    from lsmfm.io.omezarr import open_image

    return [open_image(image)[1].voxel_sizes[0]
            for entry in load_catalog(catalog) for image in entry.images()]


def run_section(data: BenchData, layout: str, n: int, workers: int, batch: int = 4) -> dict:
    images = len(voxel_sizes(data.catalog))
    warmup = 4 * images  # every image opened and its foreground map built before timing
    to64 = [float(v) * 1.5 for v in np.min(voxel_sizes(data.catalog), axis=0)]  # 96 finest voxels -> 64
    decode, chunks, megabytes = decode_ceiling(stream_config(data.catalog), warmup + n)
    loader = f"lsmfm_loader_{workers}workers"
    rows = measure([
        Pipeline("lsmfm", lsmfm_sample(stream_config(data.catalog)), n, warmup),
        Pipeline("nifti_baseline", nifti_sample(data.niftis), max(10, n // 4), len(data.niftis)),
        Pipeline("nifti_read_only", nifti_sample(data.niftis, transforms=False), n, len(data.niftis)),
        Pipeline("decode_ceiling", decode, n, warmup),
        Pipeline("lsmfm_resized64", lsmfm_sample(stream_config(data.catalog, target=to64)), n, warmup),
        Pipeline("lsmfm_augmented", lsmfm_sample(stream_config(data.catalog, augment=True)), n, warmup),
        Pipeline(loader, lsmfm_loader(stream_config(data.catalog), workers, batch), max(1, n // batch),
                 2 * workers + 2, batch, steady=False),
    ])
    return {
        "data": data.kind, "layout": layout, "data_description": data.description, "patches_timed": n,
        **{f"{k}_patches_per_s": round(v, 2) for k, v in rows.items()},
        "lsmfm_vs_baseline": round(rows["lsmfm"] / rows["nifti_baseline"], 2),
        "lsmfm_vs_ceiling": round(rows["lsmfm"] / rows["decode_ceiling"], 3),
        "chunks_per_patch": round(chunks, 2), "compressed_mb_per_patch": round(megabytes, 2),
    }


def format_section(s: dict) -> str:
    lines = [f"data: {s['data']}, {s['layout']} - {s['data_description']}",
             f"{'pipeline':<46} {'patches/s':>10}"]
    for key, value in s.items():
        if key.endswith("_patches_per_s"):
            lines.append(f"{key.removesuffix('_patches_per_s'):<46} {value:>10.1f}")
    lines.append(f"lsmfm / baseline = {s['lsmfm_vs_baseline']:.1f}x (target >= 5x); lsmfm / ceiling = "
                 f"{100 * s['lsmfm_vs_ceiling']:.0f} % (target >= 50 %); {s['chunks_per_patch']:.1f} chunks, "
                 f"{s['compressed_mb_per_patch']:.2f} MB compressed per patch")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--n", type=int, default=80, help="patches timed per pipeline (default 80)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers, loader row (default 2)")
    parser.add_argument("--data", choices=("auto", "real", "synthetic", "both"), default="auto")
    parser.add_argument("--layout", choices=("sharded", "plain", "both"), default="both",
                        help="store layout: sharded (4³ chunks per file, the default) and/or plain (a file per "
                             "chunk); default both")
    parser.add_argument("--workdir", type=Path, default=None, help="keep (and reuse) the stores here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as in DataLoader workers: patch-sized ops do not gain from threads here
    if args.data in ("real", "both") and not PAPER.is_dir():
        parser.error(f"--data {args.data}: {PAPER} is absent")
    kinds = {"auto": ["real" if PAPER.is_dir() else "synthetic"], "both": ["real", "synthetic"]}.get(
        args.data, [args.data])
    with tempfile.TemporaryDirectory(prefix="lsmfm_bench_") as tmp:
        work = args.workdir or Path(tmp)
        sections = []
        layouts = list(LAYOUTS) if args.layout == "both" else [args.layout]
        for kind in kinds:
            for layout in layouts:
                data = prepare_real(work, layout) if kind == "real" else prepare_synthetic(work, layout)
                sections.append(run_section(data, layout, args.n, args.workers))
                print(format_section(sections[-1]), flush=True)
    result = {**sections[0], "cpu_count": os.cpu_count(), "torch_threads": 1,
              "load_average_1min": round(os.getloadavg()[0], 2), "sections": sections}
    if args.json is not None:
        from lsmfm.io.atomic import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
