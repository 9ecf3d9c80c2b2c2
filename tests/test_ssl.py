"""Student-teacher meta-architecture on a tiny config: every term, image-only mode, keys, a short run."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lsmfm.models.backbones.registry import build_backbone
from lsmfm.models.backbones.unet import UNetConfig
from lsmfm.models.heads import ProjectionHead, ReconstructionHead
from lsmfm.models.masking import MaskConfig
from lsmfm.losses.clip import ClipLoss, text_ids
from lsmfm.models.ssl import ClipConfig, DistillConfig, ReconConfig, SSLConfig, SSLModel
from lsmfm.models.text import TextConfig
from ssl_helpers import blobs, write_tiny_bert

TEXTS = ["bright round nuclei, dense", "sparse gfap astrocytes"]
BACKBONE = UNetConfig(channels=[8, 16, 32], strides=[2, 2], out_channels=16)



@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), layers=2)


def tiny_config(text_path: Path | None, **overrides) -> SSLConfig:
    return SSLConfig(
        backbone=BACKBONE,
        use_text=text_path is not None,
        text=TextConfig(name_or_path=str(text_path), unfreeze_top_k=1, warmup_steps=10),
        masking=MaskConfig(block_sizes=[4, 8], ratio=0.5, ratio_start=0.5),
        distill=DistillConfig(n_prototypes=64, hidden_dim=32, bottleneck_dim=16, n_voxels=256,
                              teacher_temp_warmup=10),
        clip=ClipConfig(embed_dim=16, align_weight=0.5),
        **overrides,
    )


def test_every_term_finite_and_gradients_reach_student(tiny_bert):
    torch.manual_seed(0)
    model = SSLModel(tiny_config(tiny_bert))
    out = model(blobs(2), TEXTS, step=0, max_steps=10)
    assert sorted(out.terms) == ["align", "clip", "distill", "distill_global", "recon"]
    assert all(torch.isfinite(v) for v in out.terms.values()) and torch.isfinite(out.loss)
    expected = out.terms["recon"] + out.terms["distill"] + out.terms["distill_global"] + out.terms["clip"] \
        + 0.5 * out.terms["align"]
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    out.loss.backward()
    assert model.student.backbone.model[0].conv.unit0.conv.weight.grad.abs().sum() > 0
    assert model.mask_token.grad is not None and model.clip_loss.logit_scale.grad is not None
    assert all(p.grad is None for p in model.teacher.parameters())
    assert set(out.monitors) >= {"teacher_entropy", "feature_std", "clip_top1", "teacher_temp", "mask_ratio",
                                 "student_temp", "clip_temperature"}
    assert {k: tuple(v.shape) for k, v in out.visuals.items()} == {k: (32, 32) for k in ("input", "masked",
                                                                                         "reconstruction")}
    with pytest.raises(ValueError, match="description"):
        model(blobs(2), None, step=0, max_steps=10)


def test_projection_head_per_voxel_equals_per_row_and_is_bounded():
    head = ProjectionHead(16, n_prototypes=32, hidden_dim=24, bottleneck_dim=8)
    x = torch.randn(2, 16, 3, 4, 5)
    dense = head(x)
    rows = head(x.movedim(1, -1).reshape(-1, 16)).reshape(2, 3, 4, 5, 32).movedim(-1, 1)
    assert dense.shape == (2, 32, 3, 4, 5) and torch.allclose(dense, rows, atol=1e-6)
    assert dense.abs().max() <= 1.0 + 1e-6  # cosine logits
    assert ReconstructionHead(16, 1, 8)(x).shape == (2, 1, 3, 4, 5)


def test_paper_head_forms_light_decoder_and_mlp_layernorm(tiny_bert):
    """recon.decoder: two_conv is the paper's LightDecoder; clip.head: mlp its image_proj / text_proj."""
    decoder = ReconstructionHead(16, 1, 64, form="two_conv")
    convs = [m for m in decoder.net if isinstance(m, torch.nn.Conv3d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == \
        [(16, 64, (3, 3, 3)), (64, 32, (3, 3, 3)), (32, 1, (1, 1, 1))]
    assert sum(isinstance(m, torch.nn.ReLU) for m in decoder.net) == 2
    assert not any(isinstance(m, torch.nn.InstanceNorm3d) for m in decoder.net)
    torch.manual_seed(0)
    cfg = tiny_config(tiny_bert, recon=ReconConfig(decoder="two_conv", hidden_dim=8))
    cfg.clip = ClipConfig(embed_dim=16, head="mlp", align_weight=0.5)
    model = SSLModel(cfg)
    for proj, width in ((model.student.image_proj, 16), (model.text_encoder.proj, 32)):
        kinds = [type(m).__name__ for m in proj]
        assert kinds == ["Linear", "ReLU", "Linear", "LayerNorm"] and proj[0].in_features == width
    out = model(blobs(2), TEXTS, step=20, max_steps=30)
    assert all(torch.isfinite(v) for v in out.terms.values())
    out.loss.backward()
    assert model.student.image_proj[3].weight.grad is not None
    assert model.text_encoder.proj[0].weight.grad is not None


def test_align_detach_text_moves_only_the_image_side():
    img = torch.randn(3, 4, requires_grad=True)
    txt = torch.randn(3, 4, requires_grad=True)
    ClipLoss(align_detach_text=True)(img, txt, text_ids(list("abc"))).align.backward()
    assert txt.grad is None and img.grad.abs().sum() > 0
    ClipLoss()(img, txt, text_ids(list("abc"))).align.backward()
    assert txt.grad.abs().sum() > 0


def test_image_only_builds_no_text_model(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a text model was loaded in image-only mode")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    model = SSLModel(tiny_config(None))
    assert model.text_encoder is None and model.clip_loss is None and model.student.image_proj is None
    out = model(blobs(1), None, step=0, max_steps=10)
    assert sorted(out.terms) == ["distill", "distill_global", "recon"]


def test_checkpoint_keys_teacher_and_param_groups():
    model = SSLModel(tiny_config(None))
    monai_keys = set(build_backbone(BACKBONE).state_dict())
    state = model.state_dict()
    assert {k[len("student.backbone."):] for k in state if k.startswith("student.backbone.")} == monai_keys
    assert {k[len("teacher.backbone."):] for k in state if k.startswith("teacher.backbone.")} == monai_keys
    assert not any(p.requires_grad for p in model.teacher.parameters())
    for name, t in model.teacher.state_dict().items():
        assert torch.equal(t, model.student.state_dict()[name])
    groups = model.param_groups(weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [id(p) for p in model.parameters() if p.requires_grad]
    assert sorted(ids) == sorted(trainable) and len(ids) == len(set(ids))
    assert {g["name"]: g["weight_decay"] for g in groups} == {"decay": 0.05, "no_decay": 0.0}
    assert set(model.lr_scales(0)) >= {g["name"] for g in groups}


def test_update_teacher_counts_and_moves_towards_student():
    model = SSLModel(tiny_config(None))
    with torch.no_grad():
        model.student.backbone.model[0].conv.unit0.conv.weight.add_(1.0)
    before = model.teacher.backbone.model[0].conv.unit0.conv.weight.clone()
    model.update_teacher(0.9)
    model.update_teacher(model.teacher_momentum(10, 10))  # momentum 1.0 at the end of training
    after = model.teacher.backbone.model[0].conv.unit0.conv.weight
    assert model.teacher_updates == 2
    assert torch.allclose(after, before + 0.1)


def test_eval_mode_leaves_centres_alone():
    model = SSLModel(tiny_config(None)).eval()
    with torch.no_grad():
        model(blobs(1), None, step=0, max_steps=10)
    assert torch.count_nonzero(model.dense_loss.centre) == 0


def test_bf16_autocast_forward_is_finite():
    model = SSLModel(tiny_config(None))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(blobs(1), None, step=0, max_steps=10)
    out.loss.backward()
    assert all(torch.isfinite(v) for v in out.terms.values())


@pytest.mark.slow
def test_short_run_reconstruction_falls_and_monitors_stay_healthy(tiny_bert):
    """Fault 4 on a run: the teacher's targets keep their entropy and the features keep their spread."""
    torch.manual_seed(0)
    model = SSLModel(tiny_config(tiny_bert))
    opt = torch.optim.AdamW(model.param_groups(weight_decay=0.01), lr=3e-3)
    images, steps = blobs(2), 30
    recon, monitors = [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = 3e-3 * model.lr_scales(step)[group["name"]]
        out = model(images, TEXTS, step, steps)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.update_teacher(model.teacher_momentum(step, steps))
        recon.append(out.terms["recon"].item())
        monitors.append(out.monitors)
    assert np.mean(recon[-5:]) < 0.5 * np.mean(recon[:3]), recon
    assert all(m["teacher_entropy"] > 0.1 * math.log(64) for m in monitors[-10:])
    assert all(m["feature_std"] > 0.05 for m in monitors[-10:])
    assert model.teacher_updates == steps


def test_report_off_computes_the_same_loss_without_monitors_or_visuals():
    """The trainer asks for monitors only at log steps; the loss must not depend on it."""
    import copy

    model = SSLModel(tiny_config(None))
    twin = copy.deepcopy(model)  # same weights and centres
    torch.manual_seed(3)
    full = model(blobs(2), None, step=0, max_steps=10)
    torch.manual_seed(3)
    lean = twin(blobs(2), None, step=0, max_steps=10, report=False)
    assert lean.monitors == {} and lean.visuals == {}
    assert set(full.monitors) >= {"teacher_entropy", "feature_std", "mask_ratio"}
    assert torch.equal(full.loss, lean.loss)


@pytest.mark.parametrize("off, head, term", [
    ({"recon": ReconConfig(weight=0.0)}, "recon_head", "recon"),
    ({"distill": DistillConfig(weight=0.0, n_prototypes=64)}, "dense_head", "distill"),
    ({"distill": DistillConfig(global_weight=0.0, n_prototypes=64)}, "global_head", "distill_global"),
])
def test_a_term_with_weight_zero_builds_no_head_and_costs_nothing(off, head, term):
    base = tiny_config(None)
    cfg = SSLConfig(**{**{k: getattr(base, k) for k in ("backbone", "use_text", "masking", "distill")}, **off})
    model = SSLModel(cfg)
    assert getattr(model.student, head) is None and getattr(model.teacher, head) is None
    out = model(blobs(1), None, step=0, max_steps=10)
    assert term not in out.terms and out.terms and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.student.backbone.model[0].conv.unit0.conv.weight.grad is not None
    model.update_teacher(0.9)
