"""How the fixtures here were made: with the lsmfm of commit 90aeb2d, i.e.
    git archive 90aeb2d lsmfm | tar -x -C OLD && PYTHONPATH=OLD python tests/data/legacy/make_legacy.py \
        tests/data/legacy .
model folders and resolved configs in the on-disk layout that code wrote, plus each model's output on a
fixed input. (It uses that commit's API, e.g. `lsmfm.weights.format.save_pretrained`.)"""
import sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from lsmfm.config import load_config, save_config
from lsmfm.data.normalize import NormalizeConfig
from lsmfm.models.backbones import BackboneConfig, build_backbone
from lsmfm.tasks.config import CONFIG_CLASSES
from lsmfm.tasks.models import build_task_model, save_task_model
from lsmfm.training.pretrain import PretrainConfig
from lsmfm.weights.format import ModelConfig, save_pretrained

out = Path(sys.argv[1])
repo = Path(sys.argv[2])
torch.manual_seed(0)
x = torch.rand(1, 1, 16, 16, 16)
expected = {"input": x}
unet = BackboneConfig(channels=[4, 8], strides=[2], num_res_units=1, out_channels=4)
swin = BackboneConfig(arch="swinunetr", feature_size=12, out_channels=4, norm="instance")
(out / "swinunetr_config.json").write_text(ModelConfig(backbone=swin, patch_size=[64, 64, 64]).to_json())
for name, cfg in (("backbone_unet", unet),):
    torch.manual_seed(1)
    net = build_backbone(cfg).eval()
    save_pretrained(net, out / name, patch_size=[32, 32, 32], voxel_size=[2.0, 1.0, 1.0],
                    pretraining={"mode": "image_only", "which": "teacher", "data": ["synthetic"]})
    with torch.no_grad():
        expected[name] = net(x)
for task, head, classes in (("segment", None, None),
                            ("classify", {"kind": "mlp", "n_classes": 3, "hidden": 5}, ["a", "b", "c"]),
                            ("deblur", None, None)):
    torch.manual_seed(2)
    model = build_task_model(task, build_backbone(unet), head)
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.1)
    model.eval()
    config = ModelConfig(backbone=unet, patch_size=[32, 32, 32], normalize=NormalizeConfig(1.0, 99.0),
                         pretraining={"mode": "image_only"})
    save_task_model(model, out / task, config, class_names=classes, threshold=0.4)
    with torch.no_grad():
        expected[task] = model(x)
save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected_outputs.safetensors"))
save_config(load_config(PretrainConfig, repo / "pretrain" / "tiny.yaml"), out / "pretrain_tiny_config.yaml")
save_config(load_config(PretrainConfig, repo / "pretrain" / "swinunetr_image_only.yaml"),
            out / "pretrain_swinunetr_config.yaml")
for task in ("segment", "classify", "deblur"):
    save_config(load_config(CONFIG_CLASSES[task], repo / "finetune" / f"{task}.yaml"), out / f"finetune_{task}_config.yaml")
