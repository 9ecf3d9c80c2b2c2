"""Typed config of `lsmfm baseline2d`: which foundation model, which PEFT method, the data and the
few-shot protocol. The `data.*`, `shots`, `seeds` and `train.*` keys mirror `lsmfm finetune`, so the
2D baselines and our 3D backbone are run and scored the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lsmfm.data.normalize import NormalizeConfig
from lsmfm.tasks.config import TrainConfig, check_protocol
from lsmfm.tasks.segment import SegmentConfig

ModelName = Literal["sam", "dinov2", "dinov3", "clip"]
ModelSize = Literal["tiny", "vit_b", "vit_l", "vit_h"]


@dataclass
class ModelConfig:
    """The foundation model and its decoder.

    Args:
        name: "sam", "dinov2", "dinov3" or "clip" (vision tower).
        size: architecture when `weights` is empty (random init); "tiny" is the test/demo size.
        weights: a local folder or Hugging Face hub id in transformers format (e.g. facebook/sam-vit-base);
            empty: random weights (the architecture then comes from `size`).
        input_size: square input side in pixels; 0: the model's own (SAM 1024, DINO/CLIP 224).
        decoder: "default" (SAM: its mask decoder; DINO/CLIP: a light conv head) or "efficell"
            (multi-level adapter decoder with structure priors from the frozen features).
        init_seed: seed of the random weights when `weights` is empty (the same "pretrained" model for
            every run).
    """

    name: ModelName = "sam"
    size: ModelSize = "vit_b"
    weights: str = ""
    input_size: int = 0
    decoder: Literal["default", "efficell"] = "default"
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.input_size < 0:
            raise ValueError(f"model.input_size must be >= 0, got {self.input_size}")


@dataclass
class PeftConfig:
    """The parameter-efficient finetuning method (see `lsmfm baseline2d --list`) and its settings.

    Args:
        method: a registered method name (lora, qlora, adaptformer, ssf, fact, attention_tuning, bias_tuning,
            layernorm_tuning, frozen, full, ptsam).
        rank, alpha, dropout: LoRA/QLoRA rank and scaling alpha/rank on q and v; FacT uses `rank` too.
        adapter_dim, adapter_scale: AdaptFormer bottleneck width and output scale.
        n_tokens: PTSAM prompt tokens appended to the mask decoder's token stream.
        encoder_tokens: PTSAM deep visual prompts per encoder layer (0: decoder prompts only).
        quant_type: QLoRA 4-bit data type ("nf4" or "fp4").
    """

    method: str = "lora"
    rank: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    adapter_dim: int = 64
    adapter_scale: float = 0.1
    n_tokens: int = 8
    encoder_tokens: int = 0
    quant_type: Literal["nf4", "fp4"] = "nf4"

    def __post_init__(self) -> None:
        from lsmfm.baselines2d.registry import METHODS

        if self.method not in METHODS:
            raise ValueError(f"peft.method must be one of {sorted(METHODS)}, got {self.method!r}")
        if min(self.rank, self.adapter_dim, self.n_tokens) < 1 or self.encoder_tokens < 0:
            raise ValueError(
                "peft.rank, peft.adapter_dim and peft.n_tokens must be >= 1, peft.encoder_tokens >= 0"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"peft.dropout must be in [0, 1), got {self.dropout}")


def check_method(model: ModelConfig, peft: PeftConfig) -> None:
    """The PEFT method must apply to the model and its decoder (ValueError otherwise)."""
    from lsmfm.baselines2d.registry import METHODS

    info = METHODS[peft.method]
    if model.name not in info.models:
        raise ValueError(f"peft.method={peft.method} works with model.name in {list(info.models)}, "
                         f"got {model.name!r}")
    if model.decoder not in info.decoders:
        raise ValueError(f"peft.method={peft.method} works with model.decoder in {list(info.decoders)}, "
                         f"got {model.decoder!r}")


@dataclass
class Data2DConfig:
    """Where the labelled 2D images (or 3D volumes, used slice by slice) are.

    Args:
        train_dir, val_dir, test_dir: folders in one of three layouts: `image/` + `label/` subfolders
            (files paired by name), `<stem>.<ext>` + `<stem>_label.<ext>`, or any files matched by
            `image_glob`/`label_glob` (paired in sorted order). Images are PNG/TIFF (2D) or TIFF/NIfTI/Zarr
            (3D, sliced along Z, predictions stacked back to 3D for scoring).
        image_glob, label_glob: glob patterns inside each folder, e.g. "img*.tif" and "mask*.tif".
        test_fraction: without `test_dir`, the last fraction of the (sorted) train cases becomes the test set.
        tile: cut 2D images into non-overlapping tile x tile cases (0: whole images).
        normalize: percentile normalisation of each image or volume, as in pretraining.
    """

    train_dir: str = ""
    val_dir: str = ""
    test_dir: str = ""
    image_glob: str = ""
    label_glob: str = ""
    test_fraction: float = 0.25
    tile: int = 0
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)

    def __post_init__(self) -> None:
        if bool(self.image_glob) != bool(self.label_glob):
            raise ValueError("data.image_glob and data.label_glob must be given together")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.tile < 0:
            raise ValueError(f"data.tile must be >= 0, got {self.tile}")


@dataclass
class Train2DConfig:
    """One training run (a single shots/seed), in the one training loop of `lsmfm finetune`
    (`lsmfm.tasks.train`).

    Args:
        max_steps, batch_size, lr, weight_decay: AdamW on the trainable parameters only.
        val_every, patience: with `data.val_dir`, validate every `val_every` steps, keep the best weights and
            stop after `patience` validations without improvement (0: never stop early); without it the
            last weights are kept.
        flips: random flips and 90-degree rotations of the training images.
        device: "auto" (CUDA when available), "cpu" or "cuda".
    """

    max_steps: int = 200
    batch_size: int = 2
    lr: float = 1e-4
    weight_decay: float = 1e-4
    val_every: int = 25
    patience: int = 5
    flips: bool = True
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self) -> None:
        if min(self.max_steps, self.batch_size, self.val_every) < 1:
            raise ValueError("train.max_steps, train.batch_size and train.val_every must be >= 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.patience < 0:
            raise ValueError("train.lr must be > 0, train.weight_decay and train.patience >= 0")

    def loop(self) -> TrainConfig:
        """The settings of the shared training loop (no encoder phases: the PEFT method decides)."""
        return TrainConfig(mode="full", max_steps=self.max_steps, lr=self.lr, head_steps=0,
                           batch_size=self.batch_size, weight_decay=self.weight_decay, patience=self.patience,
                           val_every=self.val_every, flips=self.flips)


@dataclass
class Baseline2DConfig:
    """Everything one `lsmfm baseline2d` run needs; saved as RUN_DIR/config.yaml.

    Args:
        segment: the loss and threshold of `lsmfm finetune segment` (Dice + BCE or focal + soft-clDice,
            the 2D soft skeleton; foreground is label > 0).
        save_predictions: write each run's test predictions (uint8 TIFF masks) under RUN_DIR/predictions.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    data: Data2DConfig = field(default_factory=Data2DConfig)
    shots: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    train: Train2DConfig = field(default_factory=Train2DConfig)
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    save_predictions: bool = True

    def __post_init__(self) -> None:
        check_protocol(self.shots, self.seeds)
        check_method(self.model, self.peft)

    @property
    def init(self) -> str:
        """The results.csv `init` column: pretrained weights or a random ("scratch") model."""
        return "pretrained" if self.model.weights else "scratch"
