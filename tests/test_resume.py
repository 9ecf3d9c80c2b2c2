"""Resume: kill -9 mid-run, then `--resume`, continues the loss curve of an uninterrupted run bit for bit
(fixed seed, CPU), in one TensorBoard events file with every step once; SIGUSR1 checkpoints at the next
step and exits cleanly; a half-written checkpoint never becomes `latest`."""
from __future__ import annotations

import os
import signal
import threading
import time
import pytest
from pretrain_helpers import TINY, cli, synthetic_catalog, tiny_overrides

from lsmfm.config import load_config
from lsmfm.training import checkpoint
from lsmfm.training.logging import read_jsonl
from lsmfm.training.pretrain import PretrainConfig, pretrain

STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A catalog, the resume-test overrides and the losses of an uninterrupted in-process run."""
    root = tmp_path_factory.mktemp("resume")
    catalog = synthetic_catalog(root)
    # text unfrozen at step 3 and the mask-ratio ramp mid-run, so resume must restore all of their state
    overrides = tiny_overrides(catalog, STEPS, **{
        "train.checkpoint_every": 2, "train.deterministic": "true", "model.text.warmup_steps": 3,
        "model.masking.warmup_steps": 4, "train.image_every": 0, "train.keep_checkpoints": 0})
    ref = root / "reference"
    pretrain(load_config(PretrainConfig, TINY, overrides), ref)
    return root, overrides, read_jsonl(ref / "losses.jsonl")


@pytest.fixture(scope="module")
def reference_run(setup):
    return setup[0] / "reference"


def tb_scalars(run) -> list[tuple[str, int, float]]:
    """Every scalar of the run's TensorBoard events, in file order; asserts there is one events file."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    files = sorted((run / "tb").glob("events.out.tfevents.*"))
    assert len(files) == 1, files
    events = (event_pb2.Event.FromString(r) for r in RawEventFileLoader(str(files[0])).Load())
    return [(v.tag, e.step, v.simple_value) for e in events for v in e.summary.value]


def assert_same_events(run, reference) -> None:
    """One events file whose scalars (every step once) equal the uninterrupted run's, bit for bit; the
    throughput scalars (`perf/`: timings and memory, never reproducible) only at the same steps."""
    got, want = tb_scalars(run), tb_scalars(reference)
    assert len(set((tag, step) for tag, step, _ in got)) == len(got)  # no step twice
    assert sorted((tag, step) for tag, step, _ in got) == sorted((tag, step) for tag, step, _ in want)
    assert sorted(e for e in got if not e[0].startswith("perf/")) == \
        sorted(e for e in want if not e[0].startswith("perf/"))


def assert_same_curve(records: list[dict], reference: list[dict]) -> None:
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for got, want in zip(records, reference):
        assert set(got) == set(want)
        for key in want:
            assert got[key] == want[key], (got["step"], key)  # bit for bit, not within a tolerance


@pytest.mark.slow
def test_kill9_then_resume_continues_the_same_loss_curve(setup, reference_run):
    root, overrides, reference = setup
    run = root / "killed"
    proc = cli(["pretrain", "--config", str(TINY), "--out", str(run), *overrides])
    deadline = time.monotonic() + 300
    while checkpoint.latest_tag(run) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(checkpoint.latest_tag(run).split("_")[1])
    assert proc.returncode == -signal.SIGKILL and killed_at < STEPS
    resumed = cli(["pretrain", "--config", str(TINY), "--out", str(run), "--resume", *overrides])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert_same_curve(read_jsonl(run / "losses.jsonl"), reference)
    assert_same_events(run, reference_run)
    assert checkpoint.latest_tag(run) == checkpoint.tag_for(STEPS)


@pytest.mark.slow
def test_sigusr1_checkpoints_at_the_next_step_and_resume_finishes_the_curve(setup, reference_run):
    root, overrides, reference = setup
    run = root / "preempted"
    cfg = load_config(PretrainConfig, TINY, overrides)

    def preempt_after_third_step() -> None:
        while not (run / "losses.jsonl").is_file() or len(read_jsonl(run / "losses.jsonl")) < 3:
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGUSR1)

    handler = signal.getsignal(signal.SIGUSR1)
    threading.Thread(target=preempt_after_third_step, daemon=True).start()
    metrics = pretrain(cfg, run)
    assert metrics["stopped_early"] and 3 <= metrics["step"] < STEPS
    assert checkpoint.latest_tag(run) == checkpoint.tag_for(metrics["step"])
    assert signal.getsignal(signal.SIGUSR1) is handler  # the trainer's handler is removed after the run
    final = pretrain(cfg, run, resume=True)
    assert not final["stopped_early"] and final["teacher_updates"] == STEPS
    assert_same_curve(read_jsonl(run / "losses.jsonl"), reference)
    assert_same_events(run, reference_run)


def test_half_written_checkpoint_is_ignored_and_removed(tmp_path):
    """A save killed before its rename leaves `.tmp_<tag>`; `latest` still names the previous tag."""
    root = tmp_path / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "latest").write_text("step_00000002")
    (root / ".tmp_step_00000004").mkdir()
    (root / ".tmp_step_00000004" / "mp_rank_00_model_states.pt").write_bytes(b"half")
    assert checkpoint.latest_tag(tmp_path) == "step_00000002"
    checkpoint.remove_stale(root)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002"]


def test_fresh_run_refuses_a_folder_with_checkpoints(tmp_path):
    from lsmfm.errors import ConfigError

    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_00000002")
    with pytest.raises(ConfigError, match="--resume"):
        pretrain(PretrainConfig(), tmp_path)


def test_truncate_losses_drops_steps_after_the_checkpoint_and_a_cut_line(tmp_path):
    from lsmfm.training.logging import truncate_jsonl

    path = tmp_path / "losses.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5}\n'
                    '{"step": 3, "loss": 0.4}\n{"step": 4, "lo')
    truncate_jsonl(path, 2)
    assert read_jsonl(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
