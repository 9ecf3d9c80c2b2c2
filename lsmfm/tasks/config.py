"""Typed config of `lsmfm finetune`: data, the few-shot protocol and training, shared by every task.

Each task module adds its own section in its config class (`FinetuneTask.config_class`: these keys plus
`<task>:`), so a key of another task is an unknown-key error. Relative paths are relative to the
current directory (run from the repository root).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lsmfm.data.normalize import NormalizeConfig
from lsmfm.models.backbones.registry import BackboneConfig, default_backbone_config


@dataclass
class DataConfig:
    """Where the labelled patches are and how big the training crops are.

    Args:
        train_dir, val_dir, test_dir: folders of `<stem>.<ext>` images with `<stem>_label.<ext>` masks
            (and `<stem>_blurred.<ext>` for deblur); ext is .nii.gz, .nii, .tif, .tiff or .zarr.
        catalog: instead of folders, a catalog YAML whose entries carry label stores; entries are split
            by `train_ids`, `val_ids`, `test_ids`.
        patch_size: training crop size (z, y, x); empty: the pretrained model's.
        sw_size, sw_overlap: the Gaussian-blended sliding window that scores whole val/test images
            (size empty: patch_size; a larger window is faster for convolutional backbones).
    """

    train_dir: str = ""
    val_dir: str = ""
    test_dir: str = ""
    catalog: str = ""
    train_ids: list[str] = field(default_factory=list)
    val_ids: list[str] = field(default_factory=list)
    test_ids: list[str] = field(default_factory=list)
    patch_size: list[int] = field(default_factory=list)
    sw_size: list[int] = field(default_factory=list)
    sw_overlap: float = 0.5

    def __post_init__(self) -> None:
        if self.catalog and (self.train_dir or self.val_dir or self.test_dir):
            raise ValueError("set either data.catalog (with data.*_ids) or data.train_dir/val_dir/test_dir, "
                             "not both")
        for name in ("patch_size", "sw_size"):
            size = getattr(self, name)
            if size and (len(size) != 3 or min(size) < 1):
                raise ValueError(f"data.{name} must be three positive sizes (z, y, x), got {size}")
        if not 0.0 <= self.sw_overlap < 1.0:
            raise ValueError(f"data.sw_overlap must be in [0, 1), got {self.sw_overlap}")


@dataclass
class TrainConfig:
    """One training run (a single shots/seed/init); the same budget for pretrained and scratch.

    Args:
        mode: "linear" (backbone frozen, head only), "staged" (head alone for `head_steps`, then the
            encoder too at lr * encoder_lr_scale), "full" (everything from the start, encoder at
            lr * encoder_lr_scale).
        patience: validations without improvement before early stopping (0: never stop early).
        val_every: steps between validations (the best validated weights are kept).
    """

    mode: Literal["linear", "staged", "full"] = "staged"
    max_steps: int = 300
    lr: float = 1e-3
    encoder_lr_scale: float = 0.1
    head_steps: int = 50
    batch_size: int = 2
    weight_decay: float = 1e-4
    patience: int = 5
    val_every: int = 25
    flips: bool = True

    def __post_init__(self) -> None:
        if min(self.max_steps, self.batch_size, self.val_every) < 1:
            raise ValueError("train.max_steps, train.batch_size and train.val_every must be >= 1")
        if self.lr <= 0 or self.encoder_lr_scale < 0:
            raise ValueError("train.lr must be > 0 and train.encoder_lr_scale >= 0")
        if self.head_steps < 0 or self.patience < 0:
            raise ValueError("train.head_steps and train.patience must be >= 0")


def check_protocol(shots: list[int], seeds: list[int], device: str = "auto") -> None:
    """The few-shot protocol every finetune, compare and baseline2d config shares: shots, seeds, device."""
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not shots or min(shots) < 1:
        raise ValueError(f"shots must be a non-empty list of positive counts, got {shots}")
    if not seeds:
        raise ValueError("seeds must not be empty")
    if len(set(shots)) != len(shots) or len(set(seeds)) != len(seeds):
        raise ValueError(f"shots {shots} and seeds {seeds} must not repeat")


@dataclass
class FinetuneConfig:
    """Keys shared by every task.

    Args:
        init: "pretrained", "scratch" or "both" (each shots/seed trained from both at the same budget).
        pretrained: a `lsmfm.load_pretrained` source (folder, file, hf-hub:org/name or release name).
        which: the encoder of a checkpoint that holds two (the paper's): "auto" (the teacher unless its
            BatchNorm statistics were never trained, then the student), "teacher" or "student".
        bn_stats: "keep" the pretrained BatchNorm statistics, or "reestimate" them on (unlabelled)
            windows of the training images before any run; recorded in the finetuned models' config.
        scale: "native" (the images as they are; the paper finetuned so) or "pretraining": the network
            sees every input resized as its pretraining patches were (the paper's 96³ -> 64³), via
            `backbone.input_scale`, recorded in the models so `lsmfm predict` does the same.
        backbone: architecture of scratch models when no pretrained model is given (else the checkpoint's).
        normalize: intensity normalisation; empty: the pretrained model's recorded one (as in pretraining).
        keep: "best" keeps the model and test predictions of the best-validated seed per (shots, init),
            "all" of every run; results.csv always has every run.
        prediction_format: "nifti" or "zarr" (OME-Zarr) for segmentation and deblur predictions.
        device: "auto" (CUDA when available, else CPU), "cpu", "cuda" or "cuda:N".
    """

    data: DataConfig = field(default_factory=DataConfig)
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    init: Literal["pretrained", "scratch", "both"] = "both"
    pretrained: str = ""
    which: Literal["auto", "teacher", "student"] = "auto"
    bn_stats: Literal["keep", "reestimate"] = "keep"
    scale: Literal["native", "pretraining"] = "native"
    backbone: BackboneConfig = field(default_factory=default_backbone_config)
    normalize: NormalizeConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    keep: Literal["best", "all"] = "best"
    prediction_format: Literal["nifti", "zarr"] = "nifti"
    device: str = "auto"

    def __post_init__(self) -> None:
        check_protocol(self.shots, self.seeds, self.device)
        if self.init in ("pretrained", "both") and not self.pretrained:
            raise ValueError(f"init={self.init} needs `pretrained` (a load_pretrained source)")

    @property
    def inits(self) -> list[str]:
        return ["pretrained", "scratch"] if self.init == "both" else [self.init]
