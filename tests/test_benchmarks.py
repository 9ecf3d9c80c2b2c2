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
           "--threads", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "in-memory sliding window" in done.stdout and "lsmfm predict, block 64" in done.stdout
    blockwise, in_memory = json.loads(out.read_text())["rows"]
    assert blockwise["blocks"] == 8 and blockwise["windows"] > blockwise["windows_one_pass"] == 8
    assert in_memory["windows"] == 8 and in_memory["max_abs_diff_vs_blockwise"] < 1e-5
    for row in (blockwise, in_memory):
        assert row["size"] == 80 and row["rss_peak_mib"] > row["rss_baseline_mib"] > 0
