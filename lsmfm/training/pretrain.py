"""Pretraining: the student-teacher SSL model on streamed patches, driven by one DeepSpeed engine.

`pretrain(cfg, out_dir)` is the whole program behind `lsmfm pretrain`; the same code runs as one CPU
process (fp32, gloo) and as every rank of a multi-node `torchrun` job (bf16 autocast, NCCL, ZeRO).

One optimizer step = `train.grad_accum` micro-batches of `train.batch_size` patches per rank. Learning
rates (per parameter group, scaled by the model's `lr_scales`, which is how text layers are unfrozen
after warm-up), the EMA momentum and the model's own schedules are pure functions of the optimizer step,
so a resumed run recomputes them exactly. The teacher is updated once per optimizer step.
SIGUSR1/SIGTERM ask for a checkpoint at the next optimizer step, after which the run exits cleanly.
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Sequence

import numpy as np
import torch

from lsmfm.config import load_config, read_yaml, save_config, to_dict
from lsmfm.data.stream.config import StreamConfig
from lsmfm.data.stream.dataset import make_loader
from lsmfm.device import resolve_device
from lsmfm.errors import ConfigError, InputError, LsmfmError
from lsmfm.io.atomic import atomic_write_text
from lsmfm.models.ssl import SSLConfig
from lsmfm.signals import StopRequest
from lsmfm.training import checkpoint, distributed
from lsmfm.training.schedules import warmup_cosine
from lsmfm.training.validation import ValidationConfig


@dataclass
class TrainConfig:
    """Optimisation, precision, parallelism and reporting of a pretraining run.

    Args:
        max_steps: optimizer steps in the whole run.
        batch_size: patches per rank per micro-batch (the global batch is batch_size * grad_accum * ranks).
        grad_accum: micro-batches accumulated per optimizer step.
        lr, final_lr, warmup_steps: peak learning rate, linear warm-up from 0, cosine decay to final_lr.
        weight_decay, betas: AdamW settings (weight decay only on the groups the model marks for it).
        grad_clip: global gradient-norm clipping (0 disables).
        zero_stage: DeepSpeed ZeRO stage 0, 1 or 2.
        precision: "auto" (bf16 autocast on GPU, fp32 on CPU), "fp32" or "bf16".
        device: "auto", "cpu" or "cuda".
        seed: seeds the model initialisation, masks and the data stream.
        deterministic: torch.use_deterministic_algorithms (for exact resume checks).
        num_workers: DataLoader worker processes per rank.
        num_threads: torch CPU threads per rank (0 keeps torch's default).
        log_every: TensorBoard scalars every this many steps (losses.jsonl gets every step).
        image_every: TensorBoard image slices every this many steps (0 disables).
        checkpoint_every: checkpoint every this many steps (and always at the end).
        keep_checkpoints: newest checkpoints kept (0 keeps all).
        peak_tflops: one device's peak TFLOP/s for the MFU in the throughput log (0: looked up for known
            GPUs; CPUs and unknown GPUs report no MFU).
    """

    max_steps: int = 1000
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    final_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.04
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 3.0
    zero_stage: int = 1
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0
    deterministic: bool = False
    num_workers: int = 0
    num_threads: int = 0
    log_every: int = 10
    image_every: int = 100
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    peak_tflops: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"train.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        if len(self.betas) != 2:
            raise ValueError(f"train.betas must have two values, got {self.betas}")
        if self.peak_tflops < 0:
            raise ValueError(f"train.peak_tflops must be >= 0, got {self.peak_tflops}")


@dataclass
class PretrainConfig:
    """A pretraining recipe: the patch stream, the SSL model, the training settings and the validation
    split (held-out catalog entries; off by default)."""

    data: StreamConfig = field(default_factory=StreamConfig)
    model: SSLConfig = field(default_factory=SSLConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        multiple = max(self.model.backbone.size_multiple, max(self.model.masking.block_sizes))
        if any(s % multiple for s in self.data.patch_size):
            raise ValueError(f"data.patch_size {self.data.patch_size} must be a multiple of {multiple} (the "
                             f"{self.model.backbone.arch} size multiple and the largest mask block)")
        problem = self.model.backbone.size_problem(self.data.patch_size)
        if problem is not None:
            raise ValueError(f"data.patch_size {self.data.patch_size} {problem}")


def resolve_config(config: str | Path | None, overrides: Sequence[str], out_dir: str | Path,
                   resume: bool = False) -> PretrainConfig:
    """The run's config: the recipe (or, resuming without one, RUN_DIR/config.yaml) plus overrides."""
    saved = Path(out_dir) / "config.yaml"
    if config is None:
        if not (resume and saved.is_file()):
            raise ConfigError("--config is required (unless --resume finds RUN_DIR/config.yaml)")
        config = saved
    return load_config(PretrainConfig, config, overrides)


def pretrain(cfg: PretrainConfig, out_dir: str | Path, resume: bool = False, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Train, checkpoint and report; returns the final metrics (also written to RUN_DIR/metrics.json).
    `overwrite` replaces an earlier pretraining run in `out_dir` once the inputs are checked."""
    out = Path(out_dir)
    if not overwrite:
        _check_run_dir(cfg, out, resume)
    device = resolve_device(cfg.train.device, distributed.ensure_env().local_rank)
    env = distributed.init(device)
    try:
        with _run_lock(out, env, device), _torch_settings(cfg.train):
            _check_data(cfg.data)
            split_volumes(cfg)
            if overwrite and env.is_main:
                clear_run_dir(out)
            new_folder = not out.exists()
            try:
                return Trainer(cfg, out, env, device, resume, progress).run()
            except BaseException:
                if new_folder and env.is_main:
                    _remove_unfinished_run(out)
                raise
    finally:
        distributed.shutdown()


@contextlib.contextmanager
def _run_lock(out: Path, env: distributed.DistEnv, device: torch.device) -> Iterator[None]:
    """Rank 0 holds RUN_DIR's lock (`lsmfm.io.lock`) for the run; every rank stops if it is refused."""
    from lsmfm.io import lock

    fd, refused = None, None
    if env.is_main:
        try:
            fd, _ = lock.acquire(out, "lsmfm pretrain")
        except LsmfmError as exc:
            refused = exc
    if distributed.any_rank(refused is not None, device):
        raise refused or ConfigError(f"{out}: rank 0 could not lock the run folder")
    try:
        yield
    finally:
        if fd is not None:
            lock.release(out, fd)


def _check_run_dir(cfg: PretrainConfig, out: Path, resume: bool) -> None:
    """Refuse, before any work, to overwrite a run's checkpoints or to resume with another model."""
    has_ckpt = checkpoint.has_checkpoints(out)
    if has_ckpt and not resume:
        raise ConfigError(f"{out}: already holds checkpoints; pass --resume to continue it, --overwrite to "
                          "start over, or choose a new --out")
    saved = out / "config.yaml"
    if has_ckpt and saved.is_file():
        before = read_yaml(saved)
        now = to_dict(cfg)
        unvalidated = to_dict(ValidationConfig())  # runs saved before the validation section existed
        changed = [k for k in ("data", "model", "validation") if before.get(k, unvalidated) != now[k]]
        if changed:
            raise ConfigError(f"{saved}: resuming with a different {' and '.join(changed)} section than the "
                              "checkpointed run; only train.* settings may change on resume")


def clear_run_dir(out: Path) -> None:
    """Remove an earlier pretraining run folder (it holds config.yaml and checkpoints/ or losses.jsonl);
    any other non-empty folder is refused, never deleted."""
    if not out.is_dir() or not any(out.iterdir()):
        return
    ours = (out / "checkpoints").is_dir() or (out / "losses.jsonl").is_file()
    if not ((out / "config.yaml").is_file() and ours):
        raise InputError(out, "is not an lsmfm pretraining run folder (no config.yaml with checkpoints/ or "
                              "losses.jsonl); --overwrite replaces only those")
    shutil.rmtree(out)


def _check_data(data: StreamConfig) -> None:
    """Check every catalog and image (metadata only) before the slow model and engine are built and
    before the run folder exists: a typo or a missing store fails at once and leaves nothing."""
    from lsmfm.data.stream.dataset import plan_sources

    if not data.catalogs:
        raise ConfigError("data.catalogs is empty: list at least one catalog YAML")
    plan_sources(data)


def split_volumes(cfg: PretrainConfig) -> tuple[list[str] | None, list[str]]:
    """(training entry ids, validation entry ids); (None, []) without validation (every entry trains)."""
    from lsmfm.data.catalog.entries import load_catalog
    from lsmfm.data.stream.split import split_entries

    if not cfg.validation.enabled:
        return None, []
    ids = [entry.id for path in cfg.data.catalogs for entry in load_catalog(path)]
    return split_entries(ids, cfg.validation.fraction, cfg.train.seed)


def _remove_unfinished_run(out: Path) -> None:
    """A run folder this run created and that holds no checkpoint has nothing to resume: remove it, so
    the same command can simply be run again once the problem is fixed."""
    ckpts = checkpoint.checkpoint_dir(out)
    if out.is_dir() and not (ckpts.is_dir() and any(ckpts.glob("step_*"))):
        shutil.rmtree(out, ignore_errors=True)


@contextlib.contextmanager
def _torch_settings(t: TrainConfig) -> Iterator[None]:
    """Thread count and deterministic algorithms for this run, restored afterwards (runs inside tests)."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    torch.use_deterministic_algorithms(t.deterministic or deterministic)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def seed_everything(seed: int, rank: int) -> None:
    """Same model initialisation on every rank (seed), different mask streams per rank (seed + rank)."""
    torch.manual_seed(seed)
    random.seed(seed + rank)
    np.random.seed(seed + rank)


def build_engine(model: torch.nn.Module, t: TrainConfig, world_size: int, device: torch.device) -> Any:
    """DeepSpeed engine over `model` with AdamW on the model's named parameter groups."""
    from lsmfm.training import engine as ds

    optimizer = ds.make_optimizer(model.param_groups(t.weight_decay), t.lr, t.betas)
    precision = ds.resolve_precision(t.precision, device)
    ds_config = ds.build_ds_config(micro_batch=t.batch_size, grad_accum=t.grad_accum, world_size=world_size,
                                   zero_stage=t.zero_stage, precision=precision, grad_clip=t.grad_clip)
    return ds.initialize(model, optimizer, ds_config)


class Trainer:
    """Builds model, engine, data stream and logger for one run, then runs the optimizer steps."""

    def __init__(self, cfg: PretrainConfig, out: Path, env: distributed.DistEnv, device: torch.device,
                 resume: bool, progress: bool = True) -> None:
        from lsmfm.models.ssl import SSLModel
        from lsmfm.training.validation import Validator

        t = cfg.train
        self.cfg, self.out, self.env, self.device = cfg, out, env, device
        seed_everything(t.seed, env.rank)
        self.model = SSLModel(cfg.model).to(device)
        self.engine = build_engine(self.model, t, env.world_size, device)
        self.train_entries, val_entries = split_volumes(cfg)
        self.validator = (Validator(cfg, val_entries, t.seed, env.rank, env.world_size, device)
                          if val_entries else None)
        self.step, self.samples = 0, 0
        self.rng_state: dict[str, Any] | None = None
        if resume:
            self._restore()
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, out / "config.yaml")
        from lsmfm.training.logging import RunLogger

        from lsmfm.training.throughput import ThroughputMeter, peak_tflops

        self.log = RunLogger(out, env.is_main, self.step, t.max_steps, progress)
        self.meter = ThroughputMeter(math.prod(cfg.data.patch_size), env.world_size, device,
                                     peak_tflops(device, t.peak_tflops))
        self.stop = StopRequest()
        self.last: dict[str, Any] = {}

    def _restore(self) -> None:
        state = checkpoint.load(self.engine, self.out)
        if state is None:
            return
        self.step = int(state["step"])
        samples = state["samples"]
        self.samples = int(samples[self.env.rank] if self.env.rank < len(samples) else samples[0])
        self.model.teacher_updates = int(state["teacher_updates"])
        if self.validator is not None and "validation" in state:
            self.validator.load_state_dict(state["validation"])
        rngs = state["rng"]
        self.rng_state = rngs[self.env.rank] if self.env.rank < len(rngs) else None

    def run(self) -> dict[str, Any]:
        t = self.cfg.train
        start, start_step = time.perf_counter(), self.step
        batches = self._batches()
        if self.rng_state is not None:  # after the loader drew its base seed, as the interrupted run did
            checkpoint.restore_rng(self.rng_state)
        try:
            with self.stop:
                while self.step < t.max_steps:
                    self._optimizer_step(batches)
                    if self._validate():
                        self._checkpoint()
                        break
                    if self._should_stop():
                        self._checkpoint()
                        break
                    if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                        self._checkpoint()
        finally:
            self.log.close()
        return self._finish(time.perf_counter() - start, self.step - start_step)

    def _batches(self) -> Iterator[dict[str, Any]]:
        t = self.cfg.train
        loader = make_loader(self.cfg.data, batch_size=t.batch_size, num_workers=t.num_workers,
                             rank=self.env.rank, world_size=self.env.world_size, seed=t.seed,
                             start_index=self.samples, entries=self.train_entries)
        return iter(loader)

    def _optimizer_step(self, batches: Iterator[dict[str, Any]]) -> None:
        """`grad_accum` micro-batches, one optimizer step, one teacher update; then logging.

        The loss terms stay on the device until the step's end (one host read per optimizer step);
        monitors and visuals are computed only for the last micro-batch of a step that logs them.
        The step's wall time (to that host read) and its wait for batches go to the throughput meter.
        """
        from lsmfm.training.engine import set_group_lrs

        t = self.cfg.train
        start, wait, patches = time.perf_counter(), 0.0, 0
        base_lr = warmup_cosine(self.step, t.max_steps, t.lr, t.warmup_steps, t.final_lr)
        lrs = set_group_lrs(self.engine, base_lr, self.model.lr_scales(self.step))
        momentum = self.model.teacher_momentum(self.step, t.max_steps)
        report = self._logs(self.step + 1)
        values = []
        with self.meter.count_flops():
            for i in range(t.grad_accum):
                fetch = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - fetch
                patches += len(batch["image"])
                output = self._micro_step(batch, momentum, report and i == t.grad_accum - 1)
                scalars = (output.loss, *output.terms.values())
                values.append(torch.stack([v.detach().float() for v in scalars]))
        names = ["loss", *output.terms]
        sums: dict[str, float] = {}
        for row in torch.stack(values).tolist():
            for name, value in zip(names, row):
                sums[name] = sums.get(name, 0.0) + value / t.grad_accum
        self.meter.record(time.perf_counter() - start, wait, patches)
        self.step += 1
        self._report(sums, output, lrs, momentum)

    def _logs(self, step: int) -> bool:
        """Whether optimizer step `step` writes scalars or images (so its monitors are needed)."""
        return self._logs_scalars(step) or self._logs_images(step)

    def _logs_scalars(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.max_steps

    def _logs_images(self, step: int) -> bool:
        every = self.cfg.train.image_every
        return bool(every) and (step % every == 0 or step == 1)

    def _micro_step(self, batch: dict[str, Any], momentum: float, report: bool) -> Any:
        images = batch["image"].to(self.device, non_blocking=True)
        texts = list(batch["text"]) if self.cfg.model.use_text else None
        boundary = self.engine.is_gradient_accumulation_boundary()
        output = self.engine(images, texts, self.step, self.cfg.train.max_steps, report=report)
        self.engine.backward(output.loss)
        self.engine.step()
        if boundary:
            self.model.update_teacher(momentum)
        self.samples += images.shape[0]
        return output

    def _report(self, sums: dict[str, float], output: Any, lrs: dict[str, float], momentum: float) -> None:
        loss = sums.pop("loss")
        self.last = {"loss": loss, "terms": sums, "monitors": self.last.get("monitors", {})}
        self.log.step(self.step, loss, sums)
        if self._logs_scalars(self.step):
            monitors = {k: float(v) for k, v in output.monitors.items()}
            self.last["monitors"] = monitors
            perf = self.meter.read()
            self.log.throughput(perf)
            scalars = {"loss/total": loss, **{f"loss/{k}": v for k, v in sums.items()},
                       **{f"lr/{k}": v for k, v in lrs.items()}, "schedule/ema_momentum": momentum,
                       **{f"monitor/{k}": v for k, v in monitors.items()},
                       **{f"perf/{k}": v for k, v in perf.items()}}
            self.log.scalars(self.step, scalars)
        if self._logs_images(self.step):
            self.log.images(self.step, output.visuals)

    def _validate(self) -> bool:
        """Validate when due; checkpoint and mark a new best. True when patience ran out (stop)."""
        if self.validator is None or not self.validator.due(self.step):
            return False
        result = self.validator.evaluate(self.engine, self.step)
        self.log.validation(self.step, result.loss, result.terms, result.improved)
        if result.improved:
            self._checkpoint(best=True)
        return self.validator.exhausted

    def _should_stop(self) -> bool:
        return distributed.any_rank(self.stop.requested, self.device)

    def _checkpoint(self, best: bool = False) -> None:
        samples = distributed.gather_objects(self.samples)
        state = {"samples": samples, "teacher_updates": int(self.model.teacher_updates),
                 "config": to_dict(self.cfg), "scheduler": self._schedule_state()}
        if self.validator is not None:
            state["validation"] = self.validator.state_dict()
        checkpoint.save(self.engine, self.out, self.step, state, keep=self.cfg.train.keep_checkpoints,
                        best=best)

    def _schedule_state(self) -> dict[str, Any]:
        t = self.cfg.train
        return {"lr": warmup_cosine(self.step, t.max_steps, t.lr, t.warmup_steps, t.final_lr),
                "ema_momentum": self.model.teacher_momentum(self.step, t.max_steps),
                "lr_scales": self.model.lr_scales(self.step)}

    def _finish(self, seconds: float, steps: int) -> dict[str, Any]:
        done = self.out / "metrics.json"
        if steps == 0 and done.is_file():  # resumed a finished run: nothing new to report
            return json.loads(done.read_text())
        metrics = {"step": self.step, **self.last, "teacher_updates": int(self.model.teacher_updates),
                   "seconds": round(seconds, 3), "seconds_per_step": round(seconds / max(steps, 1), 4),
                   "stopped_early": self.step < self.cfg.train.max_steps,
                   "throughput": {k: round(v, 6) for k, v in self.meter.summary().items()}}
        if self.validator is not None:
            metrics["validation"] = {**self.validator.state_dict(), "tag": checkpoint.best_tag(self.out)}
        if self.env.is_main:
            atomic_write_text(done, json.dumps(metrics, indent=2) + "\n")
        return metrics
