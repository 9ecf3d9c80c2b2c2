"""The paper's pretraining step and masking, re-implemented for the side-by-side benchmark.

Source: lsm_fm_public_repo, `01-pretraining/scripts/pretrain_module_unet.py` (`PretrainModuleUnet`) and
`pretrain_module_swinunetr.py` (`PretrainModuleSwinUNETR`, the same step around a SwinUNETR), read with
the `search` tool. The paper's code cannot be imported (a Lightning module that loads its text model
from a local folder and logs to wandb), so what one training step does is re-implemented here, line for
line in behaviour, and only what the step computes (wandb tables and Lightning's `self.log` calls are
left out). The quoted lines are the paper's.

- Masking, `generate_patch_mask`: per sample a coin flip picks one block size,
  `if torch.rand((), device=x.device) < 0.5: mask_patch_size = base_mask_patch_size` else twice it;
  `num_masked_mask_patches = max(1, int(self.mask_ratio * num_total_mask_patches))` blocks of the
  aligned grid are drawn with `torch.randperm(num_total_mask_patches, device=x.device)` and set one by
  one in a Python loop over the drawn indices (`mask[b, :, z : z + mask_patch_size, ...] = True`).
  Settings: `mask_patch_size: 8`, `mask_ratio: 0.3` (`pretrain_unet_config.yaml`).
- Student and teacher, `encode_image`: `x_masked = x.clone(); x_masked[mask] = 0`, then
  `features_norm = F.normalize(features, dim=1)`; the teacher sees the full patch (an all-False mask).
- Distillation, `compute_ibot_loss`: the masked voxels of the channel-normalised features of both,
  `F.log_softmax(student_selection / self.temp_student, dim=-1)` against
  `F.softmax(teacher_selection / self.temp_teacher, dim=-1)`, `F.kl_div(..., reduction="batchmean")`.
- Reconstruction: `LightDecoder` (Conv3d(embed_dim, 64, 3) - ReLU - Conv3d(64, 32, 3) - ReLU -
  Conv3d(32, 1, 1)) on the raw student features, `F.l1_loss(student_recon * mask_downsampled,
  x_downsampled * mask_downsampled, reduction="sum") / (mask_downsampled.sum() + 1e-8)`, plus the
  composite `x_downsampled * (1.0 - mask_downsampled) + student_recon * mask_downsampled` that
  `shared_step` interpolates back to the input size at every step and hands to
  `log_image_and_embeddings` (which clamps it, masks a copy of the input and moves the embeddings to the
  host: image-only, `student_image_embed = student_out.detach().cpu()`, the whole feature map).
- Text (image+text runs): `text_proj` (Linear - ReLU - Linear - LayerNorm) on the token-mean of the
  text model, `image_proj` (AdaptiveAvgPool3d(1) - Flatten - Linear - ReLU - Linear - LayerNorm) on the
  normalised student features, CLIP on the per-device batch,
  `logits = (image_embeds @ text_embeds.T) * logit_scale` with `logit_scale.exp().clamp(1e-3, 100.0)`,
  and the alignment term `1 - F.cosine_similarity(image_embeds, text_embeds, dim=-1).mean()`.
- Optimizer and teacher: `torch.optim.AdamW((p for p in self.parameters() if p.requires_grad),
  lr=self.lr)`; `on_train_batch_end` updates the teacher parameter by parameter,
  `teacher_param.mul_(m).add_(student_param, alpha=1 - m)`. The teacher is built without gradient
  checkpointing (`use_checkpoint=False`) and, as Lightning puts the whole module in train mode, runs in
  train mode like the student.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PaperSettings:
    """The paper's step settings (`pretrain_unet_config.yaml`; SwinUNETR: see SWINUNETR_SETTINGS)."""

    mask_ratio: float = 0.3
    mask_patch_size: int = 8
    temp_student: float = 0.1
    temp_teacher: float = 0.1
    distill_weight: float = 0.29
    reconstruction_weight: float = 0.20
    align_weight: float = 0.06
    clip_weight: float = 0.36
    ema_decay: float = 0.996
    lr: float = 1e-4
    clip_temperature: float = 0.1


SWINUNETR_SETTINGS = PaperSettings(temp_student=0.025, distill_weight=0.5, reconstruction_weight=0.3,
                                   align_weight=0.05, clip_weight=0.3, ema_decay=0.994)


def paper_patch_mask(x: torch.Tensor, base_mask_patch_size: int, mask_ratio: float) -> torch.Tensor:
    """The paper's `generate_patch_mask`: (B, 1, D, H, W) bool, one block size per sample (base or twice
    it by a coin flip), ⌊ratio·N⌋ (at least 1) aligned blocks from a randperm, set one at a time."""
    b_size, _, d, h, w = x.shape
    mask = torch.zeros((b_size, 1, d, h, w), dtype=torch.bool, device=x.device)
    for b in range(b_size):
        size = base_mask_patch_size if torch.rand((), device=x.device) < 0.5 else base_mask_patch_size * 2
        nd, nh, nw = d // size, h // size, w // size
        total = nd * nh * nw
        n_masked = max(1, int(mask_ratio * total))
        for idx in torch.randperm(total, device=x.device)[:n_masked]:
            z = (idx // (nh * nw)) * size
            y = ((idx % (nh * nw)) // nw) * size
            x_ = (idx % nw) * size
            mask[b, :, z:z + size, y:y + size, x_:x_ + size] = True
    return mask


class LightDecoder(nn.Module):
    """The paper's reconstruction head: 3x3x3 convolutions to 64 and 32 channels, 1x1x1 to one channel."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.decoder = nn.Sequential(
            nn.Conv3d(embed_dim, 64, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv3d(64, 32, kernel_size=3, padding=1), nn.ReLU(inplace=True),
            nn.Conv3d(32, 1, kernel_size=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)


class PaperText(nn.Module):
    """The paper's text side: a frozen transformer (token mean of its last hidden states) and `text_proj`."""

    def __init__(self, model_path: str, embed_dim: int) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.encoder = AutoModel.from_pretrained(model_path)
        self.encoder.gradient_checkpointing_enable()
        self.encoder.requires_grad_(False)
        self.proj = nn.Sequential(nn.Linear(self.encoder.config.hidden_size, embed_dim), nn.ReLU(),
                                  nn.Linear(embed_dim, embed_dim), nn.LayerNorm(embed_dim))

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts), padding=True, truncation=True,
                                return_tensors="pt").to(self.proj[0].weight.device)
        with torch.set_grad_enabled(self.encoder.training):
            pooled = self.encoder(**tokens).last_hidden_state.mean(dim=1)
            return F.normalize(self.proj(pooled), dim=-1)


class PaperStep(nn.Module):
    """Student, teacher, decoder (and text side) of the paper's module; `loss` is its `shared_step`.

    Args:
        student: the student backbone (B, 1, D, H, W) -> (B, embed_dim, D, H, W).
        teacher: the teacher backbone (same architecture); loaded with the student's weights here.
        embed_dim: the backbones' output channels.
        settings: the paper's step settings.
        text_model: a local transformers model folder for image+text, or None for image-only.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, embed_dim: int, settings: PaperSettings,
                 text_model: str | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.student_encoder = student
        self.teacher_encoder = teacher
        self.teacher_encoder.load_state_dict(self.student_encoder.state_dict())
        self.teacher_encoder.requires_grad_(False)
        self.reconstruction_head = LightDecoder(embed_dim)
        self.text = PaperText(text_model, embed_dim) if text_model else None
        if self.text is not None:
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / settings.clip_temperature)))
            self.image_proj = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(),
                                            nn.Linear(embed_dim, embed_dim), nn.ReLU(),
                                            nn.Linear(embed_dim, embed_dim), nn.LayerNorm(embed_dim))

    def optimizer(self) -> torch.optim.AdamW:
        """`configure_optimizers`: AdamW over every trainable parameter at the paper's lr."""
        return torch.optim.AdamW((p for p in self.parameters() if p.requires_grad), lr=self.settings.lr)

    @staticmethod
    def encode_image(x: torch.Tensor, mask: torch.Tensor,
                     network: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        x_masked = x.clone()
        x_masked[mask] = 0
        features = network(x_masked)
        return features, F.normalize(features, dim=1)

    def loss(self, x: torch.Tensor, texts: Sequence[str] | None = None) -> torch.Tensor:
        """One `shared_step`: mask, student and teacher, iBOT distillation, L1 reconstruction, CLIP."""
        s = self.settings
        mask = paper_patch_mask(x, s.mask_patch_size, s.mask_ratio)
        feats, student_norm = self.encode_image(x, mask, self.student_encoder)
        with torch.no_grad():
            _, teacher_norm = self.encode_image(x, torch.zeros_like(mask), self.teacher_encoder)
        total = torch.zeros((), device=x.device)
        image_embed = text_embed = None
        if self.text is not None:
            image_embed = F.normalize(self.image_proj(student_norm), dim=-1)
            text_embed = self.text(texts)
            scale = self.logit_scale.exp().clamp(1e-3, 100.0)
            logits = (image_embed @ text_embed.T) * scale
            targets = torch.arange(logits.shape[0], device=x.device)
            clip = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
            total = total + s.clip_weight * clip
        ibot, composite = self._ibot_loss(student_norm, teacher_norm, x, mask, feats, image_embed,
                                          text_embed)
        recon_for_log = F.interpolate(composite, size=x.shape[2:], mode="trilinear", align_corners=False)
        self._logging_work(x, mask, student_norm, recon_for_log, image_embed, text_embed)
        return total + ibot

    @staticmethod
    def _logging_work(x: torch.Tensor, mask: torch.Tensor, student_norm: torch.Tensor, recon: torch.Tensor,
                      image_embed: torch.Tensor | None, text_embed: torch.Tensor | None) -> None:
        """The tensor work `log_image_and_embeddings` does at every step (its wandb tables aside): the
        clamped reconstruction, the masked input, and the embeddings copied to the host (image-only: the
        whole normalised feature map)."""
        recon.clamp(0, 1)
        masked_input = x.clone()
        masked_input[mask] = 0
        if image_embed is None:
            student_norm.detach().cpu()
        else:
            image_embed.detach().cpu()
            text_embed.detach().cpu()

    def _ibot_loss(self, student_norm: torch.Tensor, teacher_norm: torch.Tensor, x: torch.Tensor,
                   mask: torch.Tensor, feats: torch.Tensor, image_embed: torch.Tensor | None,
                   text_embed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`compute_ibot_loss`: the weighted distillation + reconstruction (+ alignment) loss and the
        composite reconstruction."""
        s = self.settings
        b, c, d, h, w = student_norm.shape
        mask_ds = F.interpolate(mask.float(), size=(d, h, w), mode="nearest")
        x_ds = F.interpolate(x, size=(d, h, w), mode="trilinear", align_corners=False)
        n = d * h * w
        stu_tok = student_norm.view(b, c, n)
        tea_tok = teacher_norm.view(b, c, n).detach()
        mask_bool = mask_ds.view(b, 1, n).to(torch.bool).squeeze(1)
        if mask_bool.any():
            student_sel = stu_tok.transpose(1, 2)[mask_bool].float()
            teacher_sel = tea_tok.transpose(1, 2)[mask_bool].float()
            distill = F.kl_div(F.log_softmax(student_sel / s.temp_student, dim=-1),
                               F.softmax(teacher_sel / s.temp_teacher, dim=-1), reduction="batchmean")
        else:
            distill = torch.tensor(0.0, device=x.device)
        recon = self.reconstruction_head(feats)
        recon_l1 = F.l1_loss(recon * mask_ds, x_ds * mask_ds, reduction="sum") / (mask_ds.sum() + 1e-8)
        total = s.distill_weight * distill + s.reconstruction_weight * recon_l1
        if image_embed is not None:
            text = F.normalize(text_embed.detach(), dim=-1)
            align = 1 - F.cosine_similarity(F.normalize(image_embed, dim=-1), text, dim=-1).mean()
            total = total + s.align_weight * align
        return total, x_ds * (1.0 - mask_ds) + recon * mask_ds

    @torch.no_grad()
    def update_teacher(self) -> None:
        """`on_train_batch_end`: the per-parameter EMA loop."""
        m = float(torch.tensor(self.settings.ema_decay).item())
        for student_param, teacher_param in zip(self.student_encoder.parameters(),
                                                self.teacher_encoder.parameters()):
            teacher_param.mul_(m).add_(student_param, alpha=1 - m)


def build_paper_step(student: nn.Module, embed_dim: int, arch: str, text_model: str | None = None,
                     teacher: nn.Module | None = None) -> PaperStep:
    """The paper's step around `student`; the teacher is a copy unless given (SwinUNETR: one built
    without gradient checkpointing, as the paper does)."""
    settings = SWINUNETR_SETTINGS if arch == "swinunetr" else PaperSettings()
    return PaperStep(student, teacher if teacher is not None else copy.deepcopy(student), embed_dim,
                     settings, text_model)
