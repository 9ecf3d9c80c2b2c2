"""`FinetuneTask`: everything a task owns, and what the one training loop, the protocol, model folders
and `lsmfm predict` ask of it (see `lsmfm.tasks.registry`).

A task turns checked `Patch`es into `Example`s (normalised input, target) once; training draws random
crops with random 3D flips from them; scoring runs the model over each whole val/test image with a
Gaussian-blended sliding window (so 96³ test patches are scored in full by a model trained on 32³ crops).
The model is the backbone plus the task's head; the task's `forward` says how the head reads the
backbone, and its head config is stored in the model folder (`config.task["head"]`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

import numpy as np
import torch
from torch import nn

from lsmfm.config import from_dict
from lsmfm.data.normalize import NormalizeConfig
from lsmfm.tasks.config import DataConfig, FinetuneConfig
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
class BioimageioOutput:
    """How a bioimage.io package (`lsmfm.bioimageio.package`) describes a dense task's output.

    Args:
        id: the output tensor's id in rdf.yaml.
        description: what it holds, at most 128 characters.
        channels: one name per output channel (the head's output channels).
        residual: the packed network adds its input to the head's output.
        tags: bioimage.io tags of the task.
    """

    id: str
    description: str
    channels: tuple[str, ...]
    residual: bool
    tags: tuple[str, ...]


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


# The single flat HeadConfig of format version 1 wrote these for every task.
FLAT_V1_HEAD_DEFAULTS: dict[str, Any] = {"out_channels": 1, "residual": True, "kind": "linear",
                                         "n_classes": 2, "hidden": 128, "dropout": 0.0}


class FinetuneTask:
    """Base of every task. Subclasses set the class attributes and implement the hooks.

    Class attributes:
        name: the registry name (`lsmfm finetune NAME`); the task's config section has this key.
        summary: one line for `lsmfm finetune --help`.
        config_class: the `FinetuneConfig` subclass with the task's section (`<name>: <Section>`).
        head_class: the head's config dataclass (stored as `config.task["head"]`).
        metrics: test metrics, in table order; val_metric: the one validation maximises.
        foreground_crops: probability that a training crop is centred on a foreground voxel.
        volume_output: what `lsmfm predict` writes: "mask" (probability + label image), "image"
            (restored intensities) or None (not a dense task).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    config_class: ClassVar[type[FinetuneConfig]] = FinetuneConfig
    head_class: ClassVar[type]
    metrics: ClassVar[tuple[str, ...]] = ()
    val_metric: ClassVar[str] = ""  # higher is better
    foreground_crops: ClassVar[float] = 0.0
    volume_output: ClassVar[Literal["mask", "image"] | None] = None

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    # ---- the model: head and forward (class-level: a saved model needs no task config) --------------
    @classmethod
    def build_head(cls, feature_dim: int, in_channels: int, head: Any) -> nn.Module:
        """The head module for a backbone with `feature_dim` features and `in_channels` inputs."""
        raise NotImplementedError

    @classmethod
    def forward(cls, backbone: nn.Module, head: nn.Module, head_cfg: Any, x: torch.Tensor) -> torch.Tensor:
        """The model's output for input `x`: by default the head on the dense features."""
        return head(backbone(x))

    @classmethod
    def read_head(cls, head: Any, source: str = "head config") -> Any:
        """The head config from None (defaults), an instance, or a mapping (a model folder's
        `task["head"]`; the other tasks' keys of the old flat layout are dropped at their defaults)."""
        if head is None:
            return cls.head_class()
        if isinstance(head, cls.head_class):
            return head
        names = {f for f in cls.head_class.__dataclass_fields__}
        data = {k: v for k, v in dict(head).items()
                if k in names or FLAT_V1_HEAD_DEFAULTS.get(k, object()) != v}
        return from_dict(cls.head_class, data, source=source)

    @classmethod
    def card_lines(cls, task: Mapping[str, Any]) -> list[str]:
        """Model-card lines about a saved model of this task (`task`: its `config.task` entry)."""
        return []

    @classmethod
    def bioimageio_output(cls, task: Mapping[str, Any], head_cfg: Any, in_channels: int
                          ) -> BioimageioOutput | None:
        """The output of this task's bioimage.io packages, or None when it cannot be exported
        (`task`: the model's `config.task`; mask outputs get sigmoid + binarize at its threshold)."""
        return None

    @classmethod
    def predict_problem(cls, head_cfg: Any) -> str | None:
        """Why `lsmfm predict` cannot run a model with this head, or None."""
        if cls.volume_output is None:
            return (f"is a {cls.name} model; `lsmfm predict` writes dense outputs (masks, restored "
                    "images), which this task does not produce")
        return None

    # ---- data, training and scoring --------------------------------------------------------------

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


