"""Student-teacher meta-architecture: masked reconstruction + EMA distillation + CLIP text alignment.

One `nn.Module` holds everything the optimizer and the checkpoint need: the student (backbone + heads),
the EMA teacher (backbone + projection heads, no gradients), the text encoder, the mask token, the CLIP
temperature and the distillation centres. Its state dict therefore holds `student.backbone.*` and
`teacher.backbone.*` with MONAI's own key names (the weights exporter relies on these).

The trainer's side of the contract (lsmfm/training/engine.py):
    groups = model.param_groups(weight_decay)            # torch optimizer from these (names kept)
    out = model(images, texts, step, max_steps)          # out.loss.backward() / engine.backward
    for g in optimizer.param_groups: g["lr"] = base_lr(step) * model.lr_scales(step)[g["name"]]
    optimizer.step(); model.update_teacher(model.teacher_momentum(step, max_steps))   # once per step

Example:
    >>> cfg = SSLConfig(backbone=UNetConfig(channels=[8, 16, 32], strides=[2, 2], out_channels=16),
    ...                 use_text=False)
    >>> model = SSLModel(cfg)
    >>> out = model(torch.rand(2, 1, 32, 32, 32), None, step=0, max_steps=10)
    >>> sorted(out.terms)
    ['distill', 'distill_global', 'recon']
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lsmfm.losses.clip import ClipLoss, text_ids
from lsmfm.losses.distillation import DistillationLoss, entropy
from lsmfm.losses.reconstruction import MaskedReconstructionLoss
from lsmfm.models.backbones.registry import BackboneConfig, build_backbone, default_backbone_config
from lsmfm.models.heads import ProjectionHead, ReconstructionHead, embedding_head
from lsmfm.models.masking import MaskConfig, apply_mask, block_mask
from lsmfm.models.text import TextConfig, TextEncoder
from lsmfm.training import schedules
from lsmfm.training.ema import EmaUpdater


@dataclass
class ReconConfig:
    """Masked reconstruction through a light decoder. kind: "l1" or "l2"; hidden_dim: decoder width;
    decoder: "conv_norm" (conv + instance norm + GELU + 1x1x1 conv) or "two_conv" (the paper's
    LightDecoder: two 3x3x3 conv + ReLU, widths hidden_dim and hidden_dim // 2, then a 1x1x1 conv)."""

    kind: Literal["l1", "l2"] = "l2"
    weight: float = 1.0
    hidden_dim: int = 32
    decoder: Literal["conv_norm", "two_conv"] = "conv_norm"

    def __post_init__(self) -> None:
        if self.hidden_dim < 1:
            raise ValueError(f"recon.hidden_dim must be >= 1, got {self.hidden_dim}")


@dataclass
class DistillConfig:
    """Self-distillation (iBOT on masked voxels + DINO on the pooled embedding) and the EMA teacher.

    Args:
        weight: weight of the dense (masked-voxel) term; global_weight: weight of the global term.
        n_prototypes, hidden_dim, bottleneck_dim: projection head sizes.
        student_temp: student softmax temperature; teacher_temp must stay below it (sharpening).
        teacher_temp_start, teacher_temp_warmup: teacher temperature ramps linearly from start over that
            many steps.
        centre_momentum: EMA momentum of the teacher centre.
        n_voxels: masked voxels sampled per patch for the dense term (0 = all; bounds the head's cost).
        ema_momentum, ema_momentum_end: teacher EMA momentum, cosine schedule over training.
    """

    weight: float = 1.0
    global_weight: float = 1.0
    n_prototypes: int = 1024
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    teacher_temp_start: float = 0.04
    teacher_temp_warmup: int = 1000
    centre_momentum: float = 0.9
    n_voxels: int = 2048
    ema_momentum: float = 0.996
    ema_momentum_end: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.teacher_temp_start <= self.teacher_temp < self.student_temp:
            raise ValueError(f"need 0 < teacher_temp_start <= teacher_temp < student_temp (the "
                             f"teacher must be sharper), got {self.teacher_temp_start}, {self.teacher_temp}, "
                             f"{self.student_temp}")
        if not 0.0 <= self.ema_momentum <= self.ema_momentum_end <= 1.0:
            raise ValueError(f"need 0 <= ema_momentum <= ema_momentum_end <= 1, got "
                             f"{self.ema_momentum}, {self.ema_momentum_end}")
        if self.n_voxels < 0 or self.teacher_temp_warmup < 0:
            raise ValueError("n_voxels and teacher_temp_warmup must be >= 0")


@dataclass
class ClipConfig:
    """Image-text alignment.

    Args:
        weight: weight of the CLIP (InfoNCE) term.
        embed_dim: dimension of the shared image-text space.
        head: projections of the pooled image features and of the text features into it: "linear", or
            "mlp" (the paper's: Linear, ReLU, Linear, LayerNorm).
        init_temperature, max_logit_scale: the learnable CLIP temperature's start and the clamp of 1/T.
        align_weight: weight of the optional per-pair (1 - cosine) term.
        align_detach_text: that term moves the image embedding only (the paper's), not the text's.
    """

    weight: float = 1.0
    embed_dim: int = 256
    head: Literal["linear", "mlp"] = "linear"
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    align_weight: float = 0.0
    align_detach_text: bool = False


@dataclass
class SSLConfig:
    """The whole pretraining model; `use_text: false` builds no text model and no CLIP term."""

    backbone: BackboneConfig = field(default_factory=default_backbone_config)
    use_text: bool = True
    text: TextConfig = field(default_factory=TextConfig)
    masking: MaskConfig = field(default_factory=MaskConfig)
    recon: ReconConfig = field(default_factory=ReconConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)

    def __post_init__(self) -> None:
        weights = (self.recon.weight, self.distill.weight, self.distill.global_weight, self.clip.weight,
                   self.clip.align_weight)
        if min(weights) < 0:
            raise ValueError(f"loss weights must be >= 0, got {weights}")


Monitors = dict[str, torch.Tensor | float]


@dataclass
class SSLOutput:
    """loss: weighted total; terms: unweighted loss terms (those with a weight above 0); monitors:
    scalars for logging (collapse monitors, temperatures, achieved mask ratio; 0-d tensors stay on the
    device until the logger reads them); visuals: (H, W) middle slices of sample 0. Monitors and
    visuals are empty unless the forward was asked to `report`."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    monitors: Monitors
    visuals: dict[str, torch.Tensor]


class Branch(nn.Module):
    """A backbone with its projection heads; the student also carries the decoder and image projection.
    A head whose loss weight is 0 is not built (None)."""

    def __init__(self, backbone: nn.Module, dense_head: nn.Module | None, global_head: nn.Module | None,
                 recon_head: nn.Module | None = None, image_proj: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.dense_head = dense_head
        self.global_head = global_head
        self.recon_head = recon_head
        self.image_proj = image_proj


def sample_masked_voxels(mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to `n` random masked voxels per sample: flat indices (B, n') and a validity mask (B, n').

    n = 0 (or n at least the voxel count) keeps every voxel; the validity mask then is the mask itself.
    """
    flat = mask.flatten(1)
    if n == 0 or n >= flat.shape[1]:
        idx = torch.arange(flat.shape[1], device=mask.device).expand(flat.shape[0], -1)
        return idx, flat
    scores = torch.rand(flat.shape, device=mask.device).masked_fill(~flat, -1.0)
    top = scores.topk(n, dim=1)
    return top.indices, top.values >= 0


def gather_voxels(features: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) features at flat voxel indices (B, n) -> (M, C) rows where valid."""
    flat = features.flatten(2)
    picked = torch.gather(flat, 2, idx.unsqueeze(1).expand(-1, flat.shape[1], -1))
    return picked.transpose(1, 2)[valid]


class SSLModel(nn.Module):
    """Student-teacher pretraining model (see the module docstring for the trainer's contract)."""

    def __init__(self, config: SSLConfig) -> None:
        super().__init__()
        self.config = config
        d, c = config.distill, config.backbone.out_channels
        use_clip = config.use_text and config.clip.weight + config.clip.align_weight > 0
        self.student = Branch(
            build_backbone(config.backbone),
            ProjectionHead(c, d.n_prototypes, d.hidden_dim, d.bottleneck_dim) if d.weight > 0 else None,
            (ProjectionHead(c, d.n_prototypes, d.hidden_dim, d.bottleneck_dim)
             if d.global_weight > 0 else None),
            ReconstructionHead(c, config.backbone.in_channels, config.recon.hidden_dim, config.recon.decoder)
            if config.recon.weight > 0 else None,
            embedding_head(config.clip.head, c, config.clip.embed_dim) if use_clip else None,
        )
        self.teacher = Branch(copy.deepcopy(self.student.backbone), copy.deepcopy(self.student.dense_head),
                              copy.deepcopy(self.student.global_head))
        self.teacher.requires_grad_(False)
        self.mask_token = (nn.Parameter(torch.full((config.backbone.in_channels,), config.masking.fill_value))
                           if config.masking.fill == "token" else None)
        self.recon_loss = MaskedReconstructionLoss(config.recon.kind)
        self.dense_loss = DistillationLoss(d.n_prototypes, d.student_temp, d.centre_momentum)
        self.global_loss = DistillationLoss(d.n_prototypes, d.student_temp, d.centre_momentum)
        self.text_encoder = (TextEncoder(config.text, config.clip.embed_dim, config.clip.head)
                             if use_clip else None)
        self.clip_loss = (ClipLoss(config.clip.init_temperature, config.clip.max_logit_scale,
                                   config.clip.align_detach_text) if use_clip else None)
        self.teacher_updates = 0
        self._ema: EmaUpdater | None = None

    # ---- schedules the trainer asks for -------------------------------------------------------------
    def teacher_momentum(self, step: int, max_steps: int) -> float:
        """EMA momentum for the optimizer step `step` (cosine from ema_momentum to ema_momentum_end)."""
        d = self.config.distill
        return schedules.ema_momentum(step, max_steps, d.ema_momentum, d.ema_momentum_end)

    def teacher_temp(self, step: int) -> float:
        """Teacher softmax temperature at `step` (linear warm-up, always below the student's)."""
        d = self.config.distill
        return schedules.teacher_temperature(step, d.teacher_temp_warmup, d.teacher_temp_start,
                                             d.teacher_temp)

    def mask_ratio(self, step: int) -> float:
        """Target masked fraction at `step` (warm-up from masking.ratio_start by masking.ratio_schedule)."""
        m = self.config.masking
        return schedules.mask_ratio(step, m.warmup_steps, m.ratio_start, m.ratio, m.ratio_schedule)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups, each {"name", "params", "weight_decay"}; empty groups are left out.

        "decay" / "no_decay": the student, mask token, CLIP temperature and text projection (biases,
        norms, 1-d parameters and prototypes without decay). "text_top_decay" / "text_top_no_decay":
        the top-k text layers, trainable from step 0 but at learning-rate scale 0 during the warm-up.
        """
        top = {id(p) for p in self.text_encoder.top_parameters()} if self.text_encoder is not None else set()
        groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "text_top_decay": [],
                                                 "text_top_no_decay": []}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = p.ndim <= 1 or name.endswith("prototypes")
            prefix = "text_top_" if id(p) in top else ""
            groups[prefix + ("no_decay" if no_decay else "decay")].append(p)
        return [{"name": k, "params": v, "weight_decay": 0.0 if k.endswith("no_decay") else weight_decay}
                for k, v in groups.items() if v]

    def lr_scales(self, step: int) -> dict[str, float]:
        """Learning-rate multiplier per group name at `step` (text top layers: 0 during the warm-up)."""
        text = self.text_encoder.lr_scale(step) if self.text_encoder is not None else 0.0
        return {"decay": 1.0, "no_decay": 1.0, "text_top_decay": text, "text_top_no_decay": text}

    def loss_weights(self) -> dict[str, float]:
        """Weight of each loss term in the total."""
        cfg = self.config
        return {"recon": cfg.recon.weight, "distill": cfg.distill.weight,
                "distill_global": cfg.distill.global_weight, "clip": cfg.clip.weight,
                "align": cfg.clip.align_weight}

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of the student into the teacher; call exactly once per optimizer step."""
        if self._ema is None:  # paired once, after the engine has placed the parameters
            self._ema = EmaUpdater(self.teacher, self.student)
        self._ema(momentum)
        self.teacher_updates += 1

    # ---- forward ------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, texts: Sequence[str] | None, step: int, max_steps: int,
                report: bool = True) -> SSLOutput:
        """All loss terms for one batch of patches (B, C, D, H, W) and their descriptions.

        report: also compute the monitors and visuals (the trainer asks only at the steps it logs).
        Terms whose weight is 0 are neither computed nor returned.
        """
        if self.text_encoder is not None and (texts is None or len(texts) != images.shape[0]):
            raise ValueError(f"use_text is on: need one description per patch, got {texts!r:.80} for "
                             f"{images.shape[0]} patches")
        cfg = self.config
        mask = block_mask(cfg.masking, images.shape[0], images.shape[2:], self.mask_ratio(step),
                          device=images.device)
        fill = self.mask_token if self.mask_token is not None else cfg.masking.fill_value
        masked = apply_mask(images, mask, fill)
        feats = self.student.backbone(masked)
        with torch.no_grad():
            t_feats = self.teacher.backbone(images)
        terms: dict[str, torch.Tensor] = {}
        monitors: Monitors = {}
        recon = self.student.recon_head(feats) if self.student.recon_head is not None else None
        if recon is not None:
            terms["recon"] = self.recon_loss(recon, images, mask)
        if report:
            monitors.update(mask_ratio=mask.float().mean(), teacher_temp=self.teacher_temp(step),
                            student_temp=cfg.distill.student_temp)
        self._distill_terms(feats, t_feats, mask, step, terms, monitors if report else None)
        if self.text_encoder is not None:
            self._clip_terms(feats, texts, step, terms, monitors if report else None)
        weights = self.loss_weights()
        loss = sum(weights[k] * v for k, v in terms.items())
        visuals = self._visuals(images, masked, recon) if report else {}
        return SSLOutput(loss=loss, terms=terms, monitors=monitors, visuals=visuals)

    @staticmethod
    def _visuals(images: torch.Tensor, masked: torch.Tensor,
                 recon: torch.Tensor | None) -> dict[str, torch.Tensor]:
        mid = images.shape[2] // 2
        visuals = {"input": images[0, 0, mid].detach().float(), "masked": masked[0, 0, mid].detach().float()}
        if recon is not None:
            visuals["reconstruction"] = recon[0, 0, mid].detach().float()
        return visuals

    def _distill_terms(self, feats: torch.Tensor, t_feats: torch.Tensor, mask: torch.Tensor, step: int,
                       terms: dict[str, torch.Tensor], monitors: Monitors | None) -> None:
        """Dense term on sampled masked voxels and global term on pooled embeddings; updates the centres."""
        temp = self.teacher_temp(step)
        if self.student.dense_head is not None:
            self._dense_term(feats, t_feats, mask, temp, terms, monitors)
        if self.student.global_head is not None:
            with torch.no_grad():
                t_global = self.teacher.global_head(t_feats.mean(dim=(2, 3, 4)))
                g_targets = self.global_loss.teacher_targets(t_global, temp)
            s_global = self.student.global_head(feats.mean(dim=(2, 3, 4)))
            terms["distill_global"] = self.global_loss(s_global, g_targets)
            if self.training:
                self.global_loss.update_centre(t_global)
            if monitors is not None:
                monitors["teacher_entropy_global"] = entropy(g_targets)

    def _dense_term(self, feats: torch.Tensor, t_feats: torch.Tensor, mask: torch.Tensor, temp: float,
                    terms: dict[str, torch.Tensor], monitors: Monitors | None) -> None:
        idx, valid = sample_masked_voxels(mask, self.config.distill.n_voxels)
        s_vox = gather_voxels(feats, idx, valid)
        with torch.no_grad():
            t_logits = self.teacher.dense_head(gather_voxels(t_feats, idx, valid))
            targets = self.dense_loss.teacher_targets(t_logits, temp)
        terms["distill"] = self.dense_loss(self.student.dense_head(s_vox), targets)
        if self.training:
            self.dense_loss.update_centre(t_logits)
        if monitors is not None:
            with torch.no_grad():
                monitors["teacher_entropy"] = entropy(targets) if len(targets) else 0.0
                normed = F.normalize(s_vox.float(), dim=-1)
                monitors["feature_std"] = normed.std(dim=0).mean() if len(normed) > 1 else 0.0

    def _clip_terms(self, feats: torch.Tensor, texts: Sequence[str], step: int,
                    terms: dict[str, torch.Tensor], monitors: Monitors | None) -> None:
        """CLIP loss between the student's pooled (masked-input) embedding and the text embedding."""
        image_emb = self.student.image_proj(feats.mean(dim=(2, 3, 4)))
        text_emb = self.text_encoder(texts, step)
        result = self.clip_loss(image_emb, text_emb, text_ids(texts, device=feats.device))
        terms["clip"] = result.loss
        terms["align"] = result.align
        if monitors is not None:
            monitors["clip_top1"] = result.top1
            monitors["clip_temperature"] = self.clip_loss.temperature
