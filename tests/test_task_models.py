"""Task models: output shapes per task, the residual deblur head, and the save/load round trip through
the weights format (state dict `backbone.*` + `head.*`, config.task)."""
from __future__ import annotations

import json

import pytest
import torch

from lsmfm.data.normalize import NormalizeConfig
from lsmfm.errors import ConfigError, InputError
from lsmfm.models.backbones.registry import build_backbone
from lsmfm.models.backbones.unet import UNetConfig
from lsmfm.tasks.classify import ClassifyHeadConfig
from lsmfm.tasks.models import TaskModel, build_task_model, load_task_model, save_task_model
from lsmfm.weights.format import ModelConfig, save_model_dir

TINY = UNetConfig(channels=[4, 8], strides=[2], num_res_units=0, out_channels=6)


def tiny_backbone(seed: int = 0, in_channels: int = 1) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_backbone(UNetConfig(channels=[4, 8], strides=[2], num_res_units=0, out_channels=6,
                                     in_channels=in_channels))


def model_config() -> ModelConfig:
    return ModelConfig(backbone=TINY, patch_size=[16, 16, 16], voxel_size=[2.0, 1.0, 1.0],
                       normalize=NormalizeConfig(1.0, 99.0), pretraining={"mode": "image_only"})


@pytest.mark.parametrize("task,head,shape", [
    ("segment", None, (2, 1, 16, 16, 16)),
    ("classify", {"kind": "linear", "n_classes": 3}, (2, 3)),
    ("classify", {"kind": "mlp", "n_classes": 4, "hidden": 5}, (2, 4)),
    ("deblur", {"residual": True}, (2, 1, 16, 16, 16)),
])
def test_output_shapes(task, head, shape):
    model = build_task_model(task, tiny_backbone(), head).eval()
    assert model(torch.rand(2, 1, 16, 16, 16)).shape == shape
    assert all(k.startswith(("backbone.", "head.")) for k in model.state_dict())


def test_untrained_deblur_model_returns_its_input():
    model = build_task_model("deblur", tiny_backbone(in_channels=2)).eval()
    x = torch.rand(1, 2, 16, 16, 16)
    assert torch.equal(model(x), x)  # zero-initialised residual head


def test_classify_uses_the_pooled_embedding():
    backbone = tiny_backbone()
    model = build_task_model("classify", backbone, ClassifyHeadConfig(kind="linear", n_classes=2)).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    linear = model.head[-1]
    expected = backbone.embed(x) @ linear.weight.T + linear.bias
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_bad_head_and_task_are_errors():
    with pytest.raises(ConfigError, match="unknown key"):
        build_task_model("classify", tiny_backbone(), {"classes": 3})
    with pytest.raises(ConfigError, match="n_classes"):
        build_task_model("classify", tiny_backbone(), {"n_classes": 1})
    with pytest.raises(ConfigError, match="unknown task"):
        TaskModel("detect", tiny_backbone(), torch.nn.Identity(), ClassifyHeadConfig())


@pytest.mark.parametrize("task,head,classes", [
    ("segment", None, None),
    ("classify", {"kind": "mlp", "n_classes": 3, "hidden": 7}, ["amyloid_plaque", "cell_nucleus", "vessels"]),
    ("deblur", None, None),
])
def test_save_load_round_trip(tmp_path, task, head, classes):
    model = build_task_model(task, tiny_backbone(seed=3), head)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.1)  # non-default head weights (the deblur head starts at zero)
    model.eval()
    out = save_task_model(model, tmp_path / "model", model_config(), class_names=classes, threshold=0.4)
    loaded, config = load_task_model(out)
    x = torch.rand(1, 1, 16, 16, 16)
    assert torch.equal(loaded(x), model(x))
    assert not loaded.training
    assert config.task["name"] == task and config.task["threshold"] == 0.4
    assert config.task["classes"] == (classes or [])
    assert config.task["head"] == json.loads(json.dumps(loaded.head_config.__dict__))
    assert config.patch_size == [16, 16, 16] and config.normalize == NormalizeConfig(1.0, 99.0)
    assert config.pretraining == {"mode": "image_only"} and config.backbone == TINY
    card = (out / "README.md").read_text()
    assert f"finetuned {task} model" in card and "load_task_model" in card


def test_backbone_half_loads_as_a_pretrained_backbone(tmp_path):
    import lsmfm

    model = build_task_model("segment", tiny_backbone(seed=5)).eval()
    save_task_model(model, tmp_path / "model", model_config())
    backbone = lsmfm.load_pretrained(str(tmp_path / "model")).eval()
    x = torch.rand(1, 1, 16, 16, 16)
    assert torch.equal(backbone(x), model.backbone(x))


def test_load_errors(tmp_path):
    model = build_task_model("classify", tiny_backbone(), {"n_classes": 2})
    with pytest.raises(ValueError, match="2 classes but 3 class names"):
        save_task_model(model, tmp_path / "bad", model_config(), class_names=["a", "b", "c"])
    assert not (tmp_path / "bad").exists()
    save_model_dir(tmp_path / "pretrained", tiny_backbone().state_dict(), model_config())
    with pytest.raises(InputError, match="without a task head"):
        load_task_model(tmp_path / "pretrained")
    seg = build_task_model("segment", tiny_backbone())
    state = {k: v for k, v in seg.state_dict().items() if not k.startswith("head.")}
    cfg = model_config()
    cfg.task = {"name": "segment", "head": {"out_channels": 1}, "classes": [], "threshold": 0.5}
    save_model_dir(tmp_path / "headless", state, cfg)
    with pytest.raises(InputError, match="weights do not match"):
        load_task_model(tmp_path / "headless")
