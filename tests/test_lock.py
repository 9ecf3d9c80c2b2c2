"""Output locks: one writer per output, refused at once naming the holder, stale locks of dead processes
taken over, and only lsmfm's own `.partial` leftovers ever removed."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lsmfm.errors import InputError, LsmfmWarning
from lsmfm.io import lock
from lsmfm.io.atomic import atomic_dir, commit_partial

HOLD = """
import sys, time
from lsmfm.io.lock import output_lock
with output_lock(sys.argv[1], "lsmfm test-holder"):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def holder(tmp_path):
    """A separate process holding the lock of tmp_path/out.zarr."""
    out = tmp_path / "out.zarr"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    yield out, proc
    proc.kill()
    proc.wait()


def test_second_writer_is_refused_naming_the_holder(holder):
    out, proc = holder
    start = time.perf_counter()
    with pytest.raises(lock.OutputLocked) as err:
        with lock.output_lock(out, "lsmfm predict"):
            pass
    assert time.perf_counter() - start < 1.0  # at once, no waiting
    message = str(err.value)
    assert "\n" not in message and str(out) in message
    assert f"lsmfm test-holder (pid {proc.pid} on {socket.gethostname()}" in message
    assert lock.read_holder(out)["pid"] == proc.pid


def test_lock_of_a_killed_process_is_taken_over(holder):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert lock.lock_path(out).exists()  # kill -9 leaves the file; the kernel dropped the flock
    with pytest.warns(LsmfmWarning, match=f"stale lock of lsmfm test-holder \\(pid {proc.pid}"):
        with lock.output_lock(out, "lsmfm ingest") as record:
            assert record["pid"] == os.getpid()
            assert lock.read_holder(out)["command"] == "lsmfm ingest"
    assert not lock.lock_path(out).exists()


def test_release_removes_the_lock_and_a_waiter_that_opened_it_retries(tmp_path):
    out = tmp_path / "run"
    fd, _ = lock.acquire(out, "first")
    stale_fd = os.open(lock.lock_path(out), os.O_RDWR)  # a second writer opened the file just now
    lock.release(out, fd)
    assert not lock.lock_path(out).exists()
    fcntl.flock(stale_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # it gets the old, unlinked file ...
    assert not lock._same_file(stale_fd, lock.lock_path(out))  # ... which acquire detects and retries
    os.close(stale_fd)
    with lock.output_lock(out, "second"):
        assert lock.read_holder(out)["command"] == "second"


@pytest.fixture
def no_flock(monkeypatch):
    """A file system without flock (some NFS mounts): the holder record alone decides."""
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(lock.fcntl, "flock", refuse)


def _write_record(out, **fields):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "command": "lsmfm predict", "started": 0}
    lock.lock_path(out).write_text(json.dumps({**record, **fields}))


def test_without_flock_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path, no_flock):
    out = tmp_path / "pred.zarr"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _write_record(out, pid=sleeper.pid, start_ticks=lock._start_ticks(sleeper.pid))
        with pytest.raises(lock.OutputLocked, match=f"pid {sleeper.pid}.*remove {lock.lock_path(out)}"):
            lock.acquire(out, "lsmfm predict")
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.warns(LsmfmWarning, match="no longer running"):
        with lock.output_lock(out, "lsmfm predict"):
            pass
    _write_record(out, host="another-node")
    with pytest.raises(lock.OutputLocked, match="on another-node"):
        lock.acquire(out, "lsmfm predict")


def test_a_reused_pid_does_not_keep_a_lock_alive(tmp_path, no_flock):
    out = tmp_path / "pred.zarr"
    _write_record(out, pid=os.getppid(), start_ticks=-1)  # a live pid, but not the process that locked
    with pytest.warns(LsmfmWarning):
        lock.release(out, lock.acquire(out, "lsmfm predict")[0])


def test_unwritable_folder_is_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(InputError, match="cannot write the output's lock file: permission denied"):
            lock.acquire(ro / "out.zarr", "lsmfm ingest")
    finally:
        ro.chmod(0o755)


def test_only_lsmfm_partials_are_removed(tmp_path):
    out = tmp_path / "out.zarr"
    foreign = tmp_path / "out.zarr.partial"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("user data")
    with pytest.raises(InputError, match="not written by lsmfm"):
        lock.partial_dir(out)
    assert (foreign / "precious.txt").read_text() == "user data"
    (foreign / "precious.txt").unlink()
    foreign.rmdir()
    partial = lock.partial_dir(out)
    (partial / "data").write_text("x")
    again = lock.partial_dir(out)  # a killed run's leftover, marked as lsmfm's: removed
    assert not (again / "data").exists() and lock.is_lsmfm_partial(again)
    commit_partial(again, out)
    assert out.is_dir() and not (out / lock.PARTIAL_MARKER).exists() and not again.exists()


def test_atomic_dir_holds_the_lock_and_cleans_its_own_leftovers(tmp_path, holder):
    out, proc = holder
    with pytest.raises(lock.OutputLocked, match=f"pid {proc.pid}"):
        with atomic_dir(out, overwrite=True):
            pass
    target = tmp_path / "model"
    leftover = tmp_path / ".model.abc123.tmp"
    leftover.mkdir()
    lock.mark_partial(leftover)
    unrelated = tmp_path / ".model.user.tmp"
    unrelated.mkdir()
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("w")
    assert (target / "weights").read_text() == "w" and not (target / lock.PARTIAL_MARKER).exists()
    assert not leftover.exists() and unrelated.exists()
    assert not lock.lock_path(target).exists()


def test_run_folders_of_pretrain_finetune_and_compare_are_locked(tmp_path, holder):
    """The second run into a run folder is refused before any set-up (the holder is another process)."""
    from types import SimpleNamespace

    from lsmfm.compare.run import run_compare
    from lsmfm.data.catalog.entries import write_catalog
    from lsmfm.tasks.fewshot import run_fewshot
    from lsmfm.training.pretrain import pretrain, resolve_config
    from pretrain_helpers import TINY, tiny_overrides

    run, proc = holder
    catalog = write_catalog(tmp_path / "c.yaml", [{"id": "a", "store": "a.zarr", "descriptions": ["t"]}])
    cfg = resolve_config(TINY, tiny_overrides(catalog, 1), run)
    with pytest.raises(lock.OutputLocked, match=f"pid {proc.pid}"):
        pretrain(cfg, run)
    with pytest.raises(lock.OutputLocked, match=f"pid {proc.pid}"):
        run_fewshot(None, run)  # refused before the plan is looked at
    with pytest.raises(lock.OutputLocked, match=f"pid {proc.pid}"):
        run_compare(SimpleNamespace(task=SimpleNamespace(name="segment")), run)  # only its name is read
    assert not run.exists()


def test_run_folders_of_baseline2d_are_locked(tmp_path, holder):
    import numpy as np
    import tifffile

    from lsmfm.baselines2d.config import Baseline2DConfig
    from lsmfm.baselines2d.train import run_baseline
    from lsmfm.config import load_config

    run, proc = holder
    label = np.zeros((32, 32), np.uint8)
    label[4:10, 4:10] = 1
    for i in range(3):
        tifffile.imwrite(tmp_path / f"i{i}.tif", label * 200 + 20 + i)
        tifffile.imwrite(tmp_path / f"i{i}_label.tif", label)
    cfg = load_config(Baseline2DConfig, None, [f"data.train_dir={tmp_path}", "data.test_fraction=0.3",
                                               "model.weights=", "model.size=tiny", "shots=[1]", "seeds=[0]"])
    with pytest.raises(lock.OutputLocked, match=f"pid {proc.pid}"):
        run_baseline(cfg, run, progress=False)
    assert not run.exists()
