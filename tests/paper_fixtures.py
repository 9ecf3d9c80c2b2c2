"""Checkpoints written the way the LSM foundation model paper's code writes them (no download).

The paper (lsm_fm_public_repo, `01-pretraining/scripts/pretrain_module_{unet,swinunetr}.py`,
`pretrain_{unet,swinunetr}.py`, `00-helpers/all_datasets_transforms.py`, `02-finetuning/scripts/`) trains
a pytorch-lightning module whose attributes give the checkpoint's key names: `student_encoder`,
`teacher_encoder` (MONAI UNet or SwinUNETR), `reconstruction_head.decoder`, `text_encoder` (a BERT),
`text_proj`, `image_proj`, `logit_scale`, the `ema_decay` buffer; `save_hyperparameters(config)` stores
its YAML config (sections training/data/model/loss_weights) as `hyper_parameters`. Its patches are NIfTI
files loaded by MONAI (LoadImaged, EnsureChannelFirstd, EnsureTyped, ScaleIntensityRangePercentilesd
1-99, Resized 96 -> 64), so every batch is a MetaTensor and so are the losses; the logged
`val_loss_report` is monitored by ModelCheckpoint and EarlyStopping, whose states (`best_model_score`,
`best_k_models`, `best_score`) land in the checkpoint's `callbacks`. The teacher is put in eval mode once
and its EMA updates parameters only (`on_train_batch_end`), so its BatchNorm statistics stay at init.

This module re-creates that with a real Trainer.fit on CPU at tiny widths; it copies no code, only the
names, layouts and library calls the paper's files show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lsmfm._monai  # noqa: F401  (MONAI without transformers)

PROMPTS = [
    "cleared mouse brain, nuclear stain, densely packed round nuclei",
    "cleared mouse brain, vascular stain, branching vessels",
]


def write_patches(folder: Path, n: int = 4, size: int = 12, seed: int = 0) -> list[Path]:
    """NIfTI patches as the paper stores them (nibabel arrays are x, y, z), one stain per folder."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        out = folder / f"vol{i % 2}" / "input" / f"patch_{i:02d}.nii.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(rng.gamma(2.0, 50.0, (size,) * 3).astype(np.float32), np.eye(4)), str(out))
        paths.append(out)
    return paths


def load_transforms(target_size: int | tuple[int, int, int]) -> Any:
    """The paper's `get_load_transforms(target_size)`."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        EnsureTyped,
        LoadImaged,
        Resized,
        ScaleIntensityRangePercentilesd,
        ToTensord,
    )

    return Compose(
        [
            LoadImaged(keys=["image"]),
            EnsureChannelFirstd(keys=["image"], channel_dim="no_channel"),
            EnsureTyped(keys=["image"]),
            ScaleIntensityRangePercentilesd(
                keys=["image"], lower=1.0, upper=99.0, b_min=0.0, b_max=1.0, clip=True
            ),
            Resized(keys=["image"], spatial_size=_size3(target_size), mode="trilinear", align_corners=False),
            ToTensord(keys=["image"]),
        ]
    )


def _size3(size: int | tuple[int, int, int]) -> tuple[int, int, int]:
    return (size,) * 3 if isinstance(size, int) else tuple(size)


class PatchDataset(torch.utils.data.Dataset):
    """{"image": path, "text": prompt} through the load transforms, as the paper's image-text dataset."""

    def __init__(self, paths: list[Path], target_size: int | tuple[int, int, int]) -> None:
        self.paths, self.transform = paths, load_transforms(target_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.paths[i]
        return self.transform(
            {"image": str(p), "text": PROMPTS[int(p.parent.parent.name[-1])], "path": str(p)}
        )


def tiny_bert(folder: Path) -> Path:
    """A random 2-layer BERT with a word-level vocabulary of the prompts, saved like bert-base-uncased."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w.strip(",") for p in PROMPTS for w in p.split()})
    vocab = folder / "vocab.txt"
    folder.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", *words]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(
        BertConfig(
            vocab_size=len(words) + 6,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        )
    ).save_pretrained(folder)
    return folder


def paper_config(arch: str, use_text: bool, text_model: Path | None, embed_dim: int) -> dict[str, Any]:
    """The YAML layout of pretrain_{unet,swinunetr}_config.yaml at tiny sizes (downsample 12 -> 8, for
    SwinUNETR 12 -> 32, stands for the paper's 96 -> 64)."""
    model = {
        "use_text": use_text,
        "mask_ratio_warmup": 0.05,
        "warmup_epochs": 20,
        "mask_ratio": 0.3,
        "lr": 0.0001,
        "ema_decay": 0.996,
        "mask_patch_size": 2,
        "temp_student": 0.1,
        "temp_teacher": 0.1,
        "text_model_name": str(text_model) if text_model else "bert-base-uncased",
        "embed_dim": embed_dim,
        "clip_temperature": 0.1,
        "save_filename": f"pretrained_{arch}",
        "max_log_images": 5,
    }
    if arch == "unet":
        model["unet"] = {"channels": [4, 8, 16], "strides": [2, 1], "num_res_units": 2, "norm": "BATCH"}
    else:
        model["swinunetr"] = {"feature_size": 12, "use_checkpoint": False}
    return {
        "training": {"seed": 100, "max_epochs": 500, "patience": 200},
        "data": {
            "enable": {"wu": True, "selma": False},
            "base_patch_size": 12,
            "use_sub_patches": False,
            "downsample": {"enabled": True, "target_size": 8 if arch == "unet" else 32},
        },
        "model": model,
        "loss_weights": {
            "distill_weight": 0.29,
            "reconstruction_weight": 0.20,
            "align_weight": 0.06,
            "clip_weight": 0.36,
        },
    }


def _encoder(arch: str, config: dict[str, Any]) -> nn.Module:
    from monai.networks.nets import SwinUNETR, UNet

    m = config["model"]
    if arch == "unet":
        u = m["unet"]
        return UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=m["embed_dim"],
            channels=u["channels"],
            strides=u["strides"],
            num_res_units=u["num_res_units"],
            norm=u["norm"],
        )
    return SwinUNETR(
        in_channels=1,
        out_channels=m["embed_dim"],
        feature_size=m["swinunetr"]["feature_size"],
        spatial_dims=3,
    )


def _lightning() -> Any:
    import pytorch_lightning as pl

    return pl


class PaperPretrainModule(_lightning().LightningModule):
    """The paper's pretraining module, reduced to what shapes its checkpoint."""

    def __init__(self, config: dict[str, Any], arch: str) -> None:
        super().__init__()
        self.save_hyperparameters(config)
        m = config["model"]
        self.use_text, self.embed_dim = m["use_text"], m["embed_dim"]
        if self.use_text:
            self.logit_scale = nn.Parameter(
                torch.tensor(np.log(1.0 / m["clip_temperature"]), dtype=torch.float)
            )
        self.reconstruction_head = nn.Module()
        self.reconstruction_head.decoder = nn.Sequential(
            nn.Conv3d(self.embed_dim, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(8, 4, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv3d(4, 1, 1),
        )
        self.student_encoder = _encoder(arch, config)
        self.teacher_encoder = _encoder(arch, config)
        self.teacher_encoder.load_state_dict(self.student_encoder.state_dict())
        for p in self.teacher_encoder.parameters():
            p.requires_grad = False
        self.teacher_encoder.eval()
        self.register_buffer("ema_decay", torch.tensor(m["ema_decay"]))
        if self.use_text:
            from transformers import AutoModel, AutoTokenizer

            self.text_tokenizer = AutoTokenizer.from_pretrained(m["text_model_name"], local_files_only=True)
            self.text_encoder = AutoModel.from_pretrained(m["text_model_name"], local_files_only=True)
            hidden = self.text_encoder.config.hidden_size
            self.text_proj = nn.Sequential(
                nn.Linear(hidden, self.embed_dim),
                nn.ReLU(),
                nn.Linear(self.embed_dim, self.embed_dim),
                nn.LayerNorm(self.embed_dim),
            )
            self.text_encoder.eval()
            self.image_proj = nn.Sequential(
                nn.AdaptiveAvgPool3d(1),
                nn.Flatten(),
                nn.Linear(self.embed_dim, self.embed_dim),
                nn.ReLU(),
                nn.Linear(self.embed_dim, self.embed_dim),
                nn.LayerNorm(self.embed_dim),
            )

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        tokens = self.text_tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
        pooled = self.text_encoder(**tokens).last_hidden_state.mean(dim=1)
        return F.normalize(self.text_proj(pooled), dim=-1)

    def _step(self, batch: dict[str, Any], prefix: str) -> torch.Tensor:
        x = batch["image"]
        mask = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) < 0.3
        x_masked = x.clone()
        x_masked[mask] = 0
        student = self.student_encoder(x_masked)
        s_norm = F.normalize(student, dim=1)
        with torch.no_grad():
            t_norm = F.normalize(self.teacher_encoder(x), dim=1)
        distill = F.kl_div(
            F.log_softmax(s_norm / 0.1, dim=1), F.softmax(t_norm / 0.1, dim=1), reduction="batchmean"
        )
        recon = F.l1_loss(self.reconstruction_head.decoder(student), x)
        loss = 0.29 * distill + 0.20 * recon
        if self.use_text:
            image = F.normalize(self.image_proj(s_norm), dim=-1)
            logits = (
                image @ self.encode_text(list(batch["text"])).T * self.logit_scale.exp().clamp(1e-3, 100.0)
            )
            targets = torch.arange(logits.shape[0])
            loss = loss + 0.36 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        self.log(f"{prefix}_loss", loss, batch_size=x.shape[0])
        if prefix == "val":
            self.log("val_loss_report", 0.3 * recon + 0.3 * distill, on_epoch=True, batch_size=x.shape[0])
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        with torch.no_grad():
            m = float(self.ema_decay)
            for s, t in zip(self.student_encoder.parameters(), self.teacher_encoder.parameters()):
                t.mul_(m).add_(s, alpha=1 - m)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams["model"]["lr"])


def _fit(
    module: Any, train: torch.utils.data.Dataset, folder: Path, filename: str, monitor: str, steps: int
) -> Path:
    """Trainer.fit with the paper's callbacks; returns the best checkpoint ModelCheckpoint wrote."""
    pl = _lightning()
    from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

    best = ModelCheckpoint(monitor=monitor, mode="min", save_top_k=1, filename=filename, dirpath=str(folder))
    loader = torch.utils.data.DataLoader(train, batch_size=2, shuffle=False)
    trainer = pl.Trainer(
        max_epochs=1,
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        callbacks=[EarlyStopping(monitor=monitor, patience=200, mode="min"), best],
    )
    trainer.fit(module, loader, loader)
    return Path(best.best_model_path)


def write_paper_pretraining_ckpt(
    folder: Path, arch: str = "unet", use_text: bool = True, embed_dim: int = 8
) -> Path:
    """`pretrained_<arch>_best.ckpt` from two steps of the paper's pretraining module."""
    torch.manual_seed(0)
    text = tiny_bert(folder / "bert") if use_text else None
    config = paper_config(arch, use_text, text, embed_dim)
    size = config["data"]["downsample"]["target_size"]
    module = PaperPretrainModule(config, arch)
    # SwinUNETR's instance norm needs 2+ voxels at its 1/32 bottleneck in training: 32 x 32 x 64 on CPU
    # (the paper's 64³ costs minutes); one step is enough, it has no BatchNorm statistics to train
    # (one batch of two patches, so the one epoch ends with its validation)
    if arch == "unet":
        data = PatchDataset(write_patches(folder / "patches"), size)
    else:
        data = PatchDataset(write_patches(folder / "patches", n=2), (32, 32, 64))
    return _fit(
        module, data, folder, f"pretrained_{arch}_best", "val_loss_report", 2 if arch == "unet" else 1
    )


class _PaperFinetuneSeg(_lightning().LightningModule):
    """The paper's `FinetuneBaseModule`: `self.model` (built by the subclass) outputs one logit channel
    and starts from a pretraining checkpoint's `student_encoder.*`, tensors of another shape dropped."""

    def _load_pretrained(self, ckpt_path: str) -> None:
        sd = torch.load(ckpt_path, map_location="cpu", weights_only=False)["state_dict"]
        mapped = {
            "model." + k[len("student_encoder.") :]: v
            for k, v in sd.items()
            if k.startswith("student_encoder.")
        }
        own = self.state_dict()
        self.load_state_dict(
            {k: v for k, v in mapped.items() if k in own and v.shape == own[k].shape}, strict=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        x = batch["image"]
        return F.binary_cross_entropy_with_logits(self(x), (x > 0.5).float())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("train_loss", loss, batch_size=2)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_loss", loss, on_epoch=True, batch_size=2)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)


class PaperFinetuneSegModule(_PaperFinetuneSeg):
    """The paper's `FinetuneUNetModule`: a MONAI UNet with one output channel."""

    def __init__(
        self,
        pretrained_ckpt: str,
        lr: float,
        channels: list[int],
        strides: list[int],
        num_res_units: int,
        norm: str,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from monai.networks.nets import UNet

        self.model = UNet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=tuple(channels),
            strides=tuple(strides),
            num_res_units=num_res_units,
            norm=norm,
        )
        self._load_pretrained(pretrained_ckpt)


class PaperFinetuneSwinSegModule(_PaperFinetuneSeg):
    """The paper's `FinetuneSwinUNETRModule` (segmentation/finetune_segmentation_swinunetr.py): its
    hyper-parameters, a MONAI SwinUNETR with `out_channels` 1 and gradient checkpointing (MONAI >= 1.5 has
    no `img_size` argument; the paper's MONAI 1.4 ignored it for the weights)."""

    def __init__(
        self,
        pretrained_ckpt: str,
        lr: float,
        weight_decay: float,
        loss_name: str,
        encoder_lr_mult: float,
        freeze_encoder_epochs: int,
        freeze_bn_stats: int,
        img_size: int,
        feature_size: int,
        out_channels: int,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from monai.networks.nets import SwinUNETR

        self.model = SwinUNETR(
            in_channels=1, out_channels=int(out_channels), feature_size=int(feature_size), use_checkpoint=True
        )
        self._load_pretrained(pretrained_ckpt)


class PaperFinetuneDeblurUNetModule(_PaperFinetuneSeg):
    """The paper's `FinetuneDeblurUNetModule` (deblurring/finetune_deblurring_unet.py): its
    hyper-parameters, a MONAI UNet with one output channel predicting a residual, the restored image
    being clamp(blurred + residual, 0, 1), monitored by `val_total_loss` (here its L1 term)."""

    def __init__(
        self,
        pretrained_ckpt: str,
        lr: float = 1e-4,
        encoder_lr_mult: float = 0.1,
        freeze_encoder_epochs: int = 0,
        freeze_bn_stats: bool = False,
        weight_decay: float = 1e-5,
        unet_channels: tuple[int, ...] = (32, 64, 128, 256, 512),
        unet_strides: tuple[int, ...] = (2, 2, 2, 1),
        unet_num_res_units: int = 2,
        unet_norm: str = "BATCH",
        edge_weight: float = 0.1,
        highfreq_weight: float = 0.1,
        init: str = "pretrained",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from monai.networks.nets import Unet

        self.model = Unet(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            channels=tuple(unet_channels),
            strides=tuple(unet_strides),
            num_res_units=unet_num_res_units,
            norm=unet_norm,
        )
        self._load_pretrained(pretrained_ckpt)

    def _loss(self, batch: dict[str, Any]) -> torch.Tensor:
        blurred = batch["image"]
        sharp = (blurred > 0.5).float()
        return F.l1_loss(torch.clamp(blurred + self(blurred), 0.0, 1.0), sharp)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        self.log("val_total_loss", loss, on_epoch=True, batch_size=2)
        return loss


def write_paper_finetuned_ckpt(folder: Path, pretrained: Path, arch: str = "unet", task: str = "segment"
                               ) -> Path:
    """`finetune_<arch>_best.ckpt` of the paper's segmentation finetuning from `pretrained` (a pretraining
    checkpoint of the same architecture), or with `task="deblur"` its UNet deblurring finetuning's
    `finetune_deblur_unet_best.ckpt`."""
    torch.manual_seed(0)
    model = torch.load(pretrained, map_location="cpu", weights_only=False)["hyper_parameters"]["model"]
    if task == "deblur":
        u = model["unet"]
        module = PaperFinetuneDeblurUNetModule(
            str(pretrained), unet_channels=tuple(u["channels"]), unet_strides=tuple(u["strides"]),
            unet_num_res_units=u["num_res_units"], unet_norm=u["norm"]
        )
        data = PatchDataset(write_patches(folder / "patches", seed=1), 12)
        return _fit(module, data, folder, "finetune_deblur_unet_best", "val_total_loss", 2)
    if arch == "unet":
        u = model["unet"]
        module = PaperFinetuneSegModule(
            str(pretrained), 3e-4, u["channels"], u["strides"], u["num_res_units"], u["norm"]
        )
        data = PatchDataset(write_patches(folder / "patches", seed=1), 12)
        return _fit(module, data, folder, "finetune_unet_best", "val_loss", 2)
    # the finetuning script's defaults, at the pretraining's feature size (its weights load only then)
    # and img_size 64 for the paper's 96; trained on 32 x 32 x 64 patches (see write_paper_pretraining_ckpt)
    module = PaperFinetuneSwinSegModule(
        str(pretrained), 3e-4, 1e-5, "dicefocal", 0.2, 10, 1, 64, model["swinunetr"]["feature_size"], 1
    )
    data = PatchDataset(write_patches(folder / "patches", n=2, seed=1), (32, 32, 64))
    return _fit(module, data, folder, "finetune_swinunetr_best", "val_loss", 1)
