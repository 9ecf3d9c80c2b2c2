"""Prediction across ranks and across interruptions: 2 torchrun ranks (gloo, CPU) write the store one
process writes, bit for bit; kill -9 of a 2-rank run, then the same command, runs only the unfinished
blocks and ends with the uninterrupted result; SIGTERM finishes the block, records it and exits 75."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from test_ngff import validate_ngff
from test_predict import SLOW_BLOCKS, save_model, synthetic_volume, write_store

REPO = Path(__file__).resolve().parents[1]
SHAPE = (96, 64, 64)  # block 32: 3 x 2 x 2 = 12 blocks of one 32³ shard each
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    save_model(root / "model")
    write_store(root / "in.zarr", synthetic_volume(SHAPE, seed=4))
    (root / "slow.py").write_text(SLOW_BLOCKS)
    return root


def _args(root: Path, out: Path) -> list[str]:
    return ["predict", "--model", str(root / "model"), "--input", str(root / "in.zarr"), "--out", str(out),
            "--block", "32", "--quiet", "--device", "cpu", "--json", str(out) + ".json"]


def _launch(root: Path, out: Path, ranks: int, slow: bool = False) -> subprocess.Popen:
    program = [str(root / "slow.py")] if slow else ["-m", "lsmfm.cli.main"]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               *(program if slow else ["--module", "lsmfm.cli.main"]), *_args(root, out)]
    else:
        cmd = [sys.executable, *program, *_args(root, out)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, code: int = 0) -> str:
    output = proc.communicate(timeout=600)[0]
    assert proc.returncode == code, output[-3000:]
    return output


def _arrays(store: Path) -> dict[str, np.ndarray]:
    """Every array of the store (each level of the probabilities and of the mask), by path."""
    root = zarr.open_group(str(store), mode="r")
    return {name: node[:] for name, node in root.members(max_depth=None) if isinstance(node, zarr.Array)}


def _kill_tree(pid: int) -> None:
    """kill -9 torchrun and its workers at once (benchmarks/predict.py's `kill_tree`)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_predict", REPO / "benchmarks" / "predict.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.kill_tree(pid)


def _ledger(out: Path) -> int:
    return len(list((out.with_name(out.name + ".partial") / ".lsmfm-ledger" / "blocks").glob("*.json")))


@pytest.fixture(scope="module")
def reference(setup):
    out = setup / "one.zarr"
    _finish(_launch(setup, out, 1))
    return out


def test_two_ranks_write_the_one_process_store_bit_for_bit(setup, reference):
    out = setup / "two.zarr"
    _finish(_launch(setup, out, 2))
    one, two = _arrays(reference), _arrays(out)
    assert sorted(one) == sorted(two) and len(one) >= 6
    for path in one:
        assert np.array_equal(one[path], two[path]), path
    root_one, root_two = zarr.open_group(str(reference), mode="r"), zarr.open_group(str(out), mode="r")
    renamed = json.loads(json.dumps(root_two.attrs["ome"]).replace('"two.zarr"', '"one.zarr"'))
    assert renamed == root_one.attrs["ome"]  # the same metadata but the image's name (the store's)
    assert root_two["labels/mask"].attrs["ome"] == root_one["labels/mask"].attrs["ome"]
    validate_ngff(out, ["mask"], levels=len(root_one.attrs["ome"]["multiscales"][0]["datasets"]))
    summary = json.loads(Path(str(out) + ".json").read_text())
    assert summary["ranks"] == 2 and summary["blocks"] == 12 and summary["blocks_done"] == 12
    assert not out.with_name("two.zarr.partial").exists() and not out.with_name("two.zarr.lock").exists()


def test_kill_9_of_two_ranks_then_the_same_command_finishes_only_the_rest(setup, reference):
    out = setup / "killed.zarr"
    proc = _launch(setup, out, 2, slow=True)
    while _ledger(out) < 3 and proc.poll() is None:
        time.sleep(0.05)
    _kill_tree(proc.pid)  # torchrun starts its workers in sessions of their own
    proc.wait()
    done = _ledger(out)
    assert 3 <= done < 12 and not out.exists()
    output = _finish(_launch(setup, out, 2))
    summary = json.loads(Path(str(out) + ".json").read_text())
    assert summary["blocks_resumed"] == done and summary["blocks_done"] == 12
    assert "took over the stale lock" in output
    one, resumed = _arrays(reference), _arrays(out)
    for path in one:
        assert np.array_equal(one[path], resumed[path]), path


def test_sigterm_finishes_the_block_records_it_and_exits_75(setup, reference):
    out = setup / "term.zarr"
    proc = _launch(setup, out, 1, slow=True)
    while _ledger(out) < 1 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output = _finish(proc, 75)
    assert "run the same command again to finish (or delete it to discard them)" in output
    done = _ledger(out)
    assert 1 <= done < 12 and not out.exists()
    _finish(_launch(setup, out, 1))
    assert json.loads(Path(str(out) + ".json").read_text())["blocks_resumed"] == done
    one, resumed = _arrays(reference), _arrays(out)
    for path in one:
        assert np.array_equal(one[path], resumed[path]), path
    assert sorted(p.name for p in setup.iterdir() if p.name.startswith("term")) == ["term.zarr",
                                                                                   "term.zarr.json"]
