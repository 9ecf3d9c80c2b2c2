"""What a pretraining run reports, on rank 0 only: TensorBoard, a per-step loss file, a progress bar.
TensorBoard (`pip install 'lsmfm[train]'`) is optional: without it runs go on without `tb/`, and say so.

- `tb/`: scalars (loss terms, learning rates, EMA momentum, temperatures, collapse monitors: teacher
  entropy, feature std, CLIP top-1) and image panels (mid-depth slices of input / masked input /
  reconstruction). One events file per run: on resume the events up to the checkpoint step are copied
  into the new writer's file and the older files removed, so curves neither fold back nor show steps
  twice (a kill between the copy and the removal is healed by the next resume: events are
  de-duplicated by step and tags).
- `losses.jsonl`: one JSON line per optimizer step (`step`, `loss` and every term), the file the
  resume test compares; on resume lines after the checkpoint step are dropped.
- `validation.jsonl`: one line per validation (`step`, the monitored `loss`, every term, `best`), likewise
  truncated on resume.
- throughput at every scalar log (`perf/`: patches/s and voxels/s over all ranks, the fraction of the
  step spent waiting for batches, seconds per step, peak memory, and TFLOP/s + MFU where the device's
  peak is known), also on the progress bar and, for the whole run, in metrics.json;
- a tqdm bar with ETA, the current loss and the throughput.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from lsmfm.errors import LsmfmWarning
from lsmfm.io.atomic import atomic_write_text


def tensorboard_writer(log_dir: str | Path, resume_step: int | None = None) -> Any:
    """A TensorBoard `SummaryWriter` on `log_dir`, or None (with one warning) when tensorboard is not
    installed: training and its other records (losses.jsonl, results.csv) go on without it.
    `resume_step`: carry the earlier files' events up to that step into the new file, remove them."""
    from lsmfm.extras import MissingExtra, require

    try:
        require("tensorboard", "train", "TensorBoard logging")
    except MissingExtra as exc:
        warnings.warn(LsmfmWarning(f"{exc}; training goes on without TensorBoard logs"), stacklevel=2)
        return None
    from torch.utils.tensorboard import SummaryWriter

    earlier = sorted(Path(log_dir).glob("events.out.tfevents.*")) if resume_step else []
    kept = kept_events(earlier, resume_step or 0)
    writer = SummaryWriter(str(log_dir))
    if earlier:
        for event in kept:
            writer.file_writer.add_event(event)
        writer.flush()
        for path in earlier:
            path.unlink()
    return writer


def kept_events(files: list[Path], last_step: int) -> list[Any]:
    """The summary events of earlier events files with step <= `last_step`, in order, once per
    (step, tags): what a resumed run keeps of its history (a record cut by a kill ends its file)."""
    if not files:
        return []
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto import event_pb2

    seen, kept = set(), []
    for path in files:
        for record in RawEventFileLoader(str(path)).Load():
            event = event_pb2.Event.FromString(record)
            key = (event.step, tuple(v.tag for v in event.summary.value))
            if event.HasField("summary") and event.step <= last_step and key not in seen:
                seen.add(key)
                kept.append(event)
    return kept


class RunLogger:
    """Rank-0 reporting for one run; on other ranks every method is a no-op."""

    def __init__(self, run_dir: str | Path, enabled: bool, start_step: int, max_steps: int,
                 progress: bool = True) -> None:
        self.enabled = enabled
        self.perf_postfix: dict[str, str] = {}
        self.run_dir = Path(run_dir)
        self.writer: Any = None
        self.bar: Any = None
        if not enabled:
            return
        from lsmfm.progress import progress_bar

        self.losses_path = self.run_dir / "losses.jsonl"
        self.validation_path = self.run_dir / "validation.jsonl"
        truncate_jsonl(self.losses_path, start_step)
        truncate_jsonl(self.validation_path, start_step)
        self.writer = tensorboard_writer(self.run_dir / "tb", resume_step=start_step or None)
        self.bar = progress_bar(total=max_steps, initial=start_step, desc="pretrain", unit="step",
                                enabled=progress)

    def step(self, step: int, loss: float, terms: Mapping[str, float]) -> None:
        """Record one optimizer step's losses in losses.jsonl and on the progress bar."""
        if not self.enabled:
            return
        record = {"step": step, "loss": loss, **{k: float(v) for k, v in terms.items()}}
        with open(self.losses_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4f}", **self.perf_postfix, refresh=False)

    def throughput(self, values: Mapping[str, float]) -> None:
        """Show the latest throughput (patches/s, data wait, MFU) on the progress bar."""
        self.perf_postfix = {}
        if "patches_per_s" in values:
            self.perf_postfix = {"patch_s": f"{values['patches_per_s']:.3g}",
                                 "wait": f"{100 * values['data_wait_fraction']:.0f}%"}
        if "mfu" in values:
            self.perf_postfix["mfu"] = f"{100 * values['mfu']:.1f}%"

    def validation(self, step: int, loss: float, terms: Mapping[str, float], best: bool) -> None:
        """Record one validation in validation.jsonl and TensorBoard ("val/loss", "val/<term>")."""
        if not self.enabled:
            return
        record = {"step": step, "loss": loss, **{k: float(v) for k, v in terms.items()}, "best": best}
        with open(self.validation_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.scalars(step, {"val/loss": loss, **{f"val/{k}": v for k, v in terms.items()}})

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """TensorBoard scalars, names like "loss/recon", "lr/backbone", "monitor/teacher_entropy"."""
        if not self.enabled or self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(name, float(value), step)

    def images(self, step: int, visuals: Mapping[str, torch.Tensor]) -> None:
        """Each visual: an (H, W) slice, or a (B, C, D, H, W) volume's mid-depth plane of sample 0."""
        if not self.enabled or self.writer is None:
            return
        for name, volume in visuals.items():
            self.writer.add_image(f"slices/{name}", as_image(volume), step, dataformats="HW")

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        self.bar.close()


def as_image(visual: torch.Tensor) -> torch.Tensor:
    """(H, W) float image in [0, 1]: the slice itself, or the middle depth plane of sample 0, channel 0."""
    plane = visual.detach()
    if plane.ndim == 5:
        plane = plane[0, 0, plane.shape[2] // 2]
    plane = plane.float().cpu()
    lo, hi = plane.min(), plane.max()
    return (plane - lo) / (hi - lo).clamp_min(1e-8)


def truncate_jsonl(path: Path, last_step: int) -> None:
    """Keep only the lines with step <= `last_step` (the steps a resumed run will not repeat)."""
    if not path.is_file():
        return
    kept = [r for r in read_jsonl(path) if r["step"] <= last_step]
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a losses.jsonl file, in order; a line cut short by a kill is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
