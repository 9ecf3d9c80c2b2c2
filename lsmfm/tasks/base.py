"""What the one training loop needs from a task: examples, batches, a loss, and scoring of whole images.

A task turns checked `Patch`es into `Example`s (normalised input, target) once; training draws random
crops with random 3D flips from them; scoring runs the model over each whole val/test image with a
Gaussian-blended sliding window (so 96³ test patches are scored in full by a model trained on 32³ crops).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lsmfm.data.normalize import NormalizeConfig
from lsmfm.tasks.config import DataConfig
from lsmfm.tasks.data import Patch, random_crop


@dataclass
class Example:
    """A normalised input (C, Z, Y, X) and its target: a dense array (C', Z, Y, X) or a class index."""

    patch: Patch
    input: np.ndarray
    target: np.ndarray | int
    foreground: np.ndarray | None = None  # (N, 3) voxel coordinates to centre some crops on
    bounds: list[tuple[float, float]] | None = None  # per-channel intensity bounds of the normalisation


@dataclass(frozen=True)
class Geometry:
    """Training crop size, and the sliding window (size, overlap) that scores whole val/test images."""

    patch: tuple[int, int, int]
    window: tuple[int, int, int]
    overlap: float


@dataclass
class Scores:
    """Mean metrics over the scored images, per-image metrics, and the predictions to write."""

    metrics: dict[str, float]
    per_image: list[dict[str, Any]] = field(default_factory=list)
    predictions: list[Any] = field(default_factory=list)


class FinetuneTask:
    """Base of segment / classify / deblur. Subclasses set the names and implement the hooks."""

    name: str = ""
    metrics: tuple[str, ...] = ()
    val_metric: str = ""  # higher is better
    foreground_crops: float = 0.0  # probability that a training crop is centred on a foreground voxel

    def load_split(self, data: DataConfig, split: str) -> list[Patch]:
        """The checked patches of one split ("train", "val" or "test"), with what the task needs."""
        raise NotImplementedError

    def setup(self, train: list[Patch], others: list[Patch]) -> None:
        """Learn what the task needs from the loaded patches (classify: the classes); may raise InputError."""

    def begin_run(self, train: list[Example]) -> None:
        """Per-run state from the run's training examples (classify: class weights)."""

    def head_config(self) -> Any:
        raise NotImplementedError

    def model_fields(self) -> dict[str, Any]:
        """Extra arguments of `save_task_model` (classify: class names; segment: threshold)."""
        return {}

    def prepare(self, patch: Patch, normalize: NormalizeConfig) -> Example:
        raise NotImplementedError

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score(self, model: nn.Module, examples: list[Example], roi: tuple[int, int, int], overlap: float
              ) -> Scores:
        """Metrics of whole images, each predicted with a sliding window of size `roi`."""
        raise NotImplementedError

    def subset(self, patches: list[Patch], shots: int, seed: int, source: str) -> list[int]:
        """Indices of the training patches of one (shots, seed); see `lsmfm.tasks.results.fewshot_subset`."""
        from lsmfm.tasks.results import fewshot_subset

        return fewshot_subset(len(patches), shots, seed, source)

    def write_predictions(self, scores: Scores, examples: list[Example], out_dir: Path, fmt: str) -> None:
        """Save the test predictions of a kept run (default: nothing)."""

    def batch(self, examples: list[Example], rng: np.random.Generator, size: tuple[int, int, int],
              batch_size: int, flips: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch: random crops (some centred on foreground) with the same random flips on
        input and target."""
        xs, ys = [], []
        for _ in range(batch_size):
            ex = examples[int(rng.integers(len(examples)))]
            box = self._crop_box(ex, rng, size)
            x = ex.input[(slice(None), *box)]
            y = ex.target[(slice(None), *box)] if isinstance(ex.target, np.ndarray) else ex.target
            if flips:
                axes = [a for a in (1, 2, 3) if rng.random() < 0.5]
                x = np.flip(x, axes)
                y = np.flip(y, axes) if isinstance(y, np.ndarray) else y
            xs.append(np.ascontiguousarray(x))
            ys.append(np.ascontiguousarray(y) if isinstance(y, np.ndarray) else y)
        target = torch.from_numpy(np.stack(ys)) if isinstance(ys[0], np.ndarray) else torch.tensor(ys)
        return torch.from_numpy(np.stack(xs)), target

    def _crop_box(self, ex: Example, rng: np.random.Generator, size: tuple[int, int, int]
                  ) -> tuple[slice, slice, slice]:
        shape = ex.input.shape[1:]
        if ex.foreground is not None and len(ex.foreground) and rng.random() < self.foreground_crops:
            centre = ex.foreground[int(rng.integers(len(ex.foreground)))]
            starts = [int(np.clip(c - s // 2, 0, d - s)) for c, s, d in zip(centre, size, shape)]
            return tuple(slice(a, a + s) for a, s in zip(starts, size))  # type: ignore[return-value]
        return random_crop(rng, shape, size)


@torch.no_grad()
def sliding_window(model: nn.Module, image: np.ndarray, roi: tuple[int, int, int], overlap: float,
                   batch_size: int = 2) -> torch.Tensor:
    """Dense model output over a whole (C, Z, Y, X) image, Gaussian-blended windows of size `roi`."""
    import lsmfm._monai  # noqa: F401  (MONAI without transformers)
    from monai.inferers import sliding_window_inference

    device = next(model.parameters()).device
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)
    out = sliding_window_inference(x, list(roi), batch_size, model, overlap=overlap, mode="gaussian",
                                   padding_mode="constant")
    return out[0].float().cpu()


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start offsets of windows of length `roi` covering [0, size) with at least `overlap` between them."""
    if size <= roi:
        return [0]
    step = max(1, int(roi * (1.0 - overlap)))
    n = int(np.ceil((size - roi) / step)) + 1
    return sorted({round(float(v)) for v in np.linspace(0, size - roi, n)})


