"""Ingest: voxels per second, peak memory per process and files written, for the store layouts (sharded,
lsmfm's default, and one file per chunk) and the schedulers (local threads; a dask.distributed
LocalCluster of worker processes, which is what `--dask-address` does with a cluster's workers).

    python benchmarks/ingest.py --json ingest.json [--sizes 512 1024] [--workers 1 2]

The source is a lazy uint16 volume (noisy background with bright blobs, generated block by block by
Dask, so the benchmark never holds it). Every run is a fresh subprocess; memory is the peak RSS
(VmHWM) of the ingesting process and, for the cluster, of each worker process. Files per TiB is the
number of files of the whole store (every pyramid level, metadata) per TiB of uint16 level-0 data; a
small store is mostly metadata and coarse levels, so the "1 TiB volume" column counts the files of a
whole 8192³ uint16 store by lsmfm's layout (`layout_files`, which must equal every measured count). The
cluster's store is compared file by file with the local one (they must be identical). Scaling
efficiency: a cluster's voxels/s over N times that of the cluster with the fewest workers (per worker
count, as for `benchmarks/predict.py`'s ranks).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BLOCK = 128
VOXEL = (2.0, 1.0, 1.0)
TIB_VOLUME = (8192, 8192, 8192)  # 1 TiB of uint16


def lazy_volume(size: int):
    """size³ uint16: background 100 ± 20 and sparse bright blobs, deterministic per block."""
    import dask.array as da

    def block(block_info=None):
        from scipy.ndimage import gaussian_filter

        (z0, z1), (y0, y1), (x0, x1) = block_info[None]["array-location"]
        rng = np.random.default_rng([z0, y0, x0])
        shape = (z1 - z0, y1 - y0, x1 - x0)
        spots = gaussian_filter((rng.random(shape) > 0.9995).astype(np.float32), 2.0) * 30000
        return np.clip(100 + spots + rng.normal(0, 20, shape), 0, 65535).astype(np.uint16)

    return da.map_blocks(block, chunks=((BLOCK,) * (size // BLOCK),) * 3, dtype=np.uint16)


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(size: int, out: str, shard: int, workers: int) -> dict:
    """Child process: one ingest of the lazy volume into `out`."""
    from lsmfm.data.ingest.cluster import dask_client
    from lsmfm.data.ingest.convert import ingest_array

    with dask_client(workers=workers or None) as client:
        start = time.perf_counter()
        ingest_array(lazy_volume(size), VOXEL, out, shard=shard, progress=False)
        seconds = time.perf_counter() - start
        worker_peaks = list(client.run(_vm_hwm_mib).values()) if client is not None else []
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    return {"seconds": seconds, "rss_peak_mib": _vm_hwm_mib(), "worker_rss_peak_mib": worker_peaks,
            "files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def layout_files(shape: tuple[int, int, int], voxel: tuple[float, float, float], shard: int) -> int:
    """Files of an ingested store of `shape` by lsmfm's layout alone (every level's shards or chunks, one
    zarr.json per level and the group's): checked against the stores measured here, then used for a
    whole 1 TiB volume, which this machine cannot write."""
    from lsmfm.data.ingest.convert import pyramid_factors
    from lsmfm.io.omezarr import level_shards

    size, files = list(shape), 1
    factors = pyramid_factors(shape, voxel, 64)
    for level in range(len(factors) + 1):
        chunks, shards = level_shards((1, *size), 64, shard)
        unit = shards or chunks
        files += 1 + int(np.prod([-(-s // u) for s, u in zip((1, *size), unit)]))
        if level < len(factors):
            size = [s // f for s, f in zip(size, factors[level])]
    return files


def child(size: int, out: Path, shard: int, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", str(size), str(out), str(shard), str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ingest run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def digest(store: Path) -> dict[str, str]:
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file()}


def run(args: argparse.Namespace) -> dict:
    default = args.shards[0]
    runs = [("threads", shard, 0) for shard in args.shards]
    runs += [(f"LocalCluster, {n} workers", default, n) for n in args.workers]
    rows = []
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="lsmfm_ingest_bench_") as tmp:
        for size in args.sizes:
            stores = {}
            for scheduler, shard, workers in runs:
                out = Path(tmp) / f"shard{shard}_workers{workers}" / f"volume{size}.zarr"
                row = child(size, out, shard, workers)
                tib = size ** 3 * 2 / 2 ** 40
                layout = f"shards of {shard}³ chunks" if shard > 1 else "a file per chunk"
                rows.append({"size": size, "scheduler": scheduler, "layout": layout, "shard": shard, **row,
                             "voxels_per_s": size ** 3 / row["seconds"], "files_per_tib": row["files"] / tib,
                             "files_by_layout": layout_files((size,) * 3, VOXEL, shard),
                             "files_1tib_volume": layout_files(TIB_VOLUME, VOXEL, shard)})
                stores[(shard, workers)] = out
            _compare_clusters(rows[-len(args.workers):], stores, default, args.workers)
            for path in stores.values():
                shutil.rmtree(path.parent)
    return {"config": {"sizes": args.sizes, "workers": args.workers, "shards": args.shards,
                       "cpu_count": os.cpu_count(),
                       "load_average_1min_start": round(load, 2),
                       "load_average_1min_end": round(os.getloadavg()[0], 2)}, "rows": rows}


def _compare_clusters(rows: list[dict], stores: dict, shard: int, workers: list[int]) -> None:
    """Each cluster row: the same store as local threads? and its scaling over the fewest workers."""
    local = digest(stores[(shard, 0)])
    base = rows[0]["voxels_per_s"] / workers[0]
    for row, n in zip(rows, workers):
        row["workers"] = n
        row["same_store_as_threads"] = digest(stores[(shard, n)]) == local
        row["scaling_efficiency"] = row["voxels_per_s"] / n / base


def table(result: dict) -> str:
    c = result["config"]
    lines = [f"lazy uint16 volume, chunks 64³, {c['cpu_count']} cores, load {c['load_average_1min_start']}-"
             f"{c['load_average_1min_end']}",
             f"{'volume':>7} {'scheduler':<24} {'layout':<23} {'s':>7} {'Mvox/s':>7} {'peak MiB':>9} "
             f"{'worker peaks MiB':>17} {'scaling':>7} {'files':>6} {'files/TiB':>10} {'1 TiB volume':>13} "
             f"{'MB':>8}"]
    for r in result["rows"]:
        peaks = "/".join(f"{p:.0f}" for p in r["worker_rss_peak_mib"]) or "-"
        same = {True: " (same store)", False: " (DIFFERENT store)"}.get(r.get("same_store_as_threads"), "")
        scaling = f"{r['scaling_efficiency']:.2f}" if "scaling_efficiency" in r else "-"
        lines.append(f"{r['size']:>6}³ {r['scheduler']:<24} {r['layout']:<23} {r['seconds']:>7.1f} "
                     f"{r['voxels_per_s'] / 1e6:>7.1f} {r['rss_peak_mib']:>9.0f} {peaks:>17} {scaling:>7} "
                     f"{r['files']:>6} "
                     f"{r['files_per_tib']:>10.0f} {r['files_1tib_volume']:>13} {r['bytes'] / 1e6:>8.1f}"
                     f"{same}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512], help="cube edges, multiples of 128")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2],
                        help="LocalCluster worker process counts, one cluster run each (default 1 2)")
    parser.add_argument("--shards", type=int, nargs="+", default=[4, 8, 1],
                        help="chunks per shard side to compare; the first also runs on the cluster (4 8 1)")
    parser.add_argument("--json", default=None, help="write the result to this JSON file")
    parser.add_argument("--measure", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        size, out, shard, workers = args.measure
        print(json.dumps(measure(int(size), out, int(shard), int(workers))))
        return 0
    if any(s % BLOCK for s in args.sizes):
        parser.error(f"--sizes must be multiples of {BLOCK}")
    result = run(args)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
