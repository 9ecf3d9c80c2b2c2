"""Pretraining validation on held-out volumes: the loss on fixed patches, the best step, early stopping.

The catalog entries are split once (`lsmfm.data.stream.split`): training streams the training entries
only, and validation reads `batches` batches per rank from the held-out ones, without augmentation (the
paper validates without its train transforms). The patches are read once and kept; each evaluation
draws the same masks and voxel samples (a fixed seed per batch, inside `torch.random.fork_rng`, so the
training random stream is untouched) and runs the model in eval mode without gradients, with the
objective's end values (target mask ratio, final teacher temperature): scores of different steps are
comparable, also across the mask-ratio warm-up. The monitored loss weighs the terms by
`validation.weights`, or by the training weights when that is empty, and is averaged over ranks.

Example (what the trainer does):
    >>> train_ids, val_ids = split_entries(entry_ids, cfg.validation.fraction, cfg.train.seed)
    >>> validator = Validator(cfg, val_ids, seed=0, rank=0, world_size=1, device=torch.device("cpu"))
    >>> result = validator.evaluate(engine, step=100)   # ValResult(loss, terms, improved)
    >>> validator.exhausted                              # patience reached: stop the run
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from lsmfm.data.stream.config import StreamConfig
from lsmfm.training import distributed

TERMS = ("recon", "distill", "distill_global", "clip", "align", "distill_kl", "distill_global_kl")
# distill_kl = distill - H(teacher targets): the KL(teacher || student) the paper's F.kl_div computes. The
# cross-entropy also counts the teacher's own entropy, which moves as the teacher learns whatever the
# student does; the KL is the part the student controls, so it is the one to select checkpoints by.
KL_OF = {"distill_kl": ("distill", "teacher_entropy"), "distill_global_kl": ("distill_global",
                                                                            "teacher_entropy_global")}


@dataclass
class ValidationConfig:
    """Validation split and schedule of a pretraining run.

    Args:
        fraction: share of catalog entries (volumes) held out; 0 trains on every entry, without validation.
        every: validate every this many optimizer steps (and at the last step).
        batches: batches of train.batch_size per rank in each validation, the same patches every time.
        weights: weight per term of the monitored loss: the loss terms (recon, distill, distill_global,
            clip, align) or distill_kl, distill_global_kl (the cross-entropies less the teacher's entropy);
            empty: the training weights. The paper monitors 0.3 recon + 0.3 distill (a KL) + 0.3 clip
            + 0.1 align.
        patience: stop after this many validations without a new best (0: never).
    """

    fraction: float = 0.0
    every: int = 100
    batches: int = 4
    weights: dict[str, float] = field(default_factory=dict)
    patience: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"validation.fraction must be in [0, 1), got {self.fraction}")
        if self.every < 1 or self.batches < 1 or self.patience < 0:
            raise ValueError(f"need validation.every >= 1, batches >= 1, patience >= 0, got {self.every}, "
                             f"{self.batches}, {self.patience}")
        unknown = sorted(set(self.weights) - set(TERMS))
        if unknown or any(w < 0 for w in self.weights.values()):
            raise ValueError(f"validation.weights: terms must be among {list(TERMS)} with weights >= 0, "
                             f"got {self.weights}")

    @property
    def enabled(self) -> bool:
        return self.fraction > 0


@dataclass
class ValResult:
    """loss: the monitored (weighted) loss; terms: unweighted terms averaged over batches and ranks."""

    loss: float
    terms: dict[str, float]
    improved: bool


class Validator:
    """Fixed validation batches of the held-out entries, the best score so far and the patience count."""

    def __init__(self, cfg: Any, entries: list[str], seed: int, rank: int, world_size: int,
                 device: torch.device) -> None:
        self.cfg: ValidationConfig = cfg.validation
        self.data: StreamConfig = dataclasses.replace(
            cfg.data, augment=dataclasses.replace(cfg.data.augment, enabled=False))
        self.entries, self.seed, self.rank, self.world_size = entries, seed, rank, world_size
        self.batch_size, self.device, self.use_text = cfg.train.batch_size, device, cfg.model.use_text
        self.max_steps = cfg.train.max_steps
        self.best_loss, self.best_step, self.bad = float("inf"), 0, 0
        self._batches: list[dict[str, Any]] | None = None

    def due(self, step: int) -> bool:
        return step % self.cfg.every == 0 or step == self.max_steps

    @property
    def exhausted(self) -> bool:
        return self.cfg.patience > 0 and self.bad >= self.cfg.patience

    def batches(self) -> list[dict[str, Any]]:
        """This rank's validation batches: samples rank, rank + W, ... of the held-out entries' stream."""
        if self._batches is None:
            from lsmfm.data.stream.dataset import PatchStream, collate_patches

            stream = PatchStream(self.data, seed=self.seed, entries=self.entries)
            n = self.cfg.batches * self.batch_size
            samples = [stream.sample(self.rank + self.world_size * i) for i in range(n)]
            self._batches = [collate_patches(samples[i:i + self.batch_size])
                             for i in range(0, n, self.batch_size)]
        return self._batches

    def evaluate(self, engine: Any, step: int) -> ValResult:
        """Collective: the validation loss of the current model; updates the best step and patience."""
        sums: dict[str, float] = {}
        engine.eval()
        try:
            for b, batch in enumerate(self.batches()):
                for name, value in self._batch_terms(engine, batch, b).items():
                    sums[name] = sums.get(name, 0.0) + value / self.cfg.batches
        finally:
            engine.train()
        ranks = distributed.gather_objects(sums)
        terms = {k: sum(r[k] for r in ranks) / len(ranks) for k in sums}
        weights = self.cfg.weights or engine.module.loss_weights()
        loss = sum(weights.get(k, 0.0) * v for k, v in terms.items())
        improved = loss < self.best_loss
        if improved:
            self.best_loss, self.best_step, self.bad = loss, step, 0
        else:
            self.bad += 1
        return ValResult(loss=loss, terms=terms, improved=improved)

    def _batch_terms(self, engine: Any, batch: dict[str, Any], index: int) -> dict[str, float]:
        images = batch["image"].to(self.device)
        texts = list(batch["text"]) if self.use_text else None
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(self.seed * 1_000_003 + self.rank * 1009 + index)
            out = engine(images, texts, self.max_steps, self.max_steps)
        terms = {k: float(v) for k, v in out.terms.items()}
        for kl, (ce, entropy) in KL_OF.items():
            if ce in terms and entropy in out.monitors:
                terms[kl] = terms[ce] - float(out.monitors[entropy])
        return terms

    def state_dict(self) -> dict[str, Any]:
        return {"best_loss": self.best_loss, "best_step": self.best_step, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_loss, self.best_step, self.bad = float(state["best_loss"]), int(state["best_step"]), \
            int(state["bad"])
