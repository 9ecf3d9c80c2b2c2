"""The benchmark scripts run as documented, on tiny inputs (their numbers are not asserted: timing
belongs to the benchmarks, not to unit tests; their correctness checks are)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_predict_benchmark_compares_blockwise_with_in_memory(tmp_path):
    out = tmp_path / "predict.json"
    cmd = [sys.executable, str(REPO / "benchmarks/predict.py"), "--sizes", "80", "--blocks", "64",
           "--ranks", "1", "2", "--threads", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "in-memory sliding window" in done.stdout and "lsmfm predict, block 64, 2 ranks" in done.stdout
    one, two, in_memory = json.loads(out.read_text())["rows"]
    assert one["blocks"] == 8 and one["windows"] > one["windows_one_pass"] == 8
    assert two["ranks"] == 2 and sorted(two["blocks_run_per_rank"]) == [4, 4] and one["all_outputs_identical"]
    assert in_memory["windows"] == 8 and in_memory["max_abs_diff_vs_blockwise"] < 1e-5
    for row in (one, two, in_memory):
        assert row["size"] == 80 and row["rss_peak_mib"] > row["rss_baseline_mib"] > 0
    assert two["scaling_efficiency"] > 0 and one["files_per_tib_float32"] > 0


def test_ingest_benchmark_compares_layouts_and_schedulers(tmp_path):
    out = tmp_path / "ingest.json"
    cmd = [sys.executable, str(REPO / "benchmarks/ingest.py"), "--sizes", "128", "--shards", "2", "1",
           "--workers", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "LocalCluster, 1 workers" in done.stdout
    sharded, plain, cluster = json.loads(out.read_text())["rows"]
    assert plain["files"] > sharded["files"] == cluster["files"] and cluster["same_store_as_threads"]
    assert len(cluster["worker_rss_peak_mib"]) == 1
