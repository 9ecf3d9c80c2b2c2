"""Structure: a new task or backbone is one module plus one registry line (a toy of each runs through
pretraining, export, finetuning and prediction); no import cycle; files written before the registries
still load; README's layout section matches the tree."""
from __future__ import annotations

import ast
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from finetune_helpers import data_overrides, write_dataset
from pretrain_helpers import TINY, synthetic_catalog, tiny_overrides

import lsmfm
from lsmfm.config import load_config, to_dict
from lsmfm.errors import ConfigError
from lsmfm.models.backbones.registry import BACKBONES, register_backbone
from lsmfm.models.backbones.swinunetr import SwinUNETRConfig
from lsmfm.models.backbones.unet import UNetConfig
from lsmfm.tasks.models import load_task_model
from lsmfm.tasks.registry import TASKS, finetune_config_class, register_task
from lsmfm.training.pretrain import PretrainConfig
from lsmfm.weights.format import ModelConfig

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "lsmfm"
LEGACY = Path(__file__).parent / "data" / "legacy"


# ---------------------------------------------------------------- one module + one registry line each
@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(BACKBONES, "toy", "toy_backbone:ToyNetConfig")  # the toy backbone's one line
    monkeypatch.setitem(TASKS, "toy", "toy_task:InvertTask")  # the toy task's one line


@pytest.mark.slow
def test_toy_backbone_and_toy_task_run_through_pretraining_export_finetuning_and_prediction(toys, tmp_path):
    from lsmfm.cli.main import main
    from lsmfm.tasks.predict import PredictOptions, predict_volume
    from lsmfm.weights.export import export_run
    from toy_backbone import ToyNet

    catalog = synthetic_catalog(tmp_path / "stores")
    cfg = load_config(PretrainConfig, TINY, tiny_overrides(catalog, 2, **{
        "model.backbone": "{arch: toy, width: 4, out_channels: 8}", "model.use_text": "false",
        "data.patch_size": "[16,16,16]", "train.checkpoint_every": 2, "train.image_every": 0}))
    from lsmfm.training.pretrain import pretrain

    pretrain(cfg, tmp_path / "pretrain")
    weights = export_run(tmp_path / "pretrain", tmp_path / "weights")
    assert type(lsmfm.load_pretrained(weights)) is ToyNet
    assert "toy conv net, width 4" in (weights / "README.md").read_text()

    dirs = write_dataset(tmp_path / "patches", n_train=1, n_eval=1, size=32)
    run = tmp_path / "ft"
    assert main(["finetune", "toy", "--out", str(run), *data_overrides(dirs), f"pretrained={weights}",
                 "init=both", "shots=[1]", "seeds=[0]", "train.max_steps=3", "train.val_every=3",
                 "toy.l1_weight=2.0", "device=cpu"]) == 0
    with open(run / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["init"] for r in rows] == ["pretrained", "scratch"]
    assert all(float(r["neg_l1"]) < 0 for r in rows)
    assert sorted(p.name for p in (run / "scratch" / "shots1_seed0" / "predictions").iterdir())[0].endswith(
        "_inverted.nii.gz")
    model_dir = run / "pretrained" / "shots1_seed0" / "model"
    model, config = load_task_model(model_dir)
    assert type(model.backbone) is ToyNet and config.task["name"] == "toy"
    assert config.task["head"] == {"bias": True} and to_dict(config.backbone)["arch"] == "toy"
    card = (model_dir / "README.md").read_text()
    assert "Toy task: inverts" in card and "lsmfm predict" in card
    volume = next(dirs["test"].glob("cell_nucleus_patch_*_ch0.nii.gz"))
    summary = predict_volume(model_dir, volume, tmp_path / "pred.zarr",
                             PredictOptions(block=32, device="cpu"), progress=False)
    assert summary["task"] == "toy" and summary["shape"] == [32, 32, 32]


def test_registry_names_are_checked():
    with pytest.raises(ValueError, match="already registered"):
        register_task("segment", "lsmfm.tasks.segment:SegmentTask")
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("unet", "lsmfm.models.backbones.unet:UNetConfig")
    with pytest.raises(ConfigError, match="unknown task 'detect'; expected one of segment, classify, deblur"):
        finetune_config_class("detect")
    with pytest.raises(ConfigError, match="unknown backbone arch .vit.; expected one of unet, swinunetr"):
        load_config(PretrainConfig, None, ["model.backbone.arch=vit"])
    with pytest.raises(ConfigError, match=r"unknown key\(s\) model.backbone.feature_size"):
        load_config(PretrainConfig, None, ["model.backbone.feature_size=48"])  # not a UNet argument


# ---------------------------------------------------------------- no import cycles
def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """lsmfm module -> the lsmfm modules it imports, at module level or inside functions (not under
    `if TYPE_CHECKING:`)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            test = getattr(node, "test", None)
            if isinstance(node, ast.If) and getattr(test, "id", getattr(test, "attr", "")) == "TYPE_CHECKING":
                node.body = []
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_has_no_cycle_even_through_function_level_imports():
    graph = import_graph()
    assert len(graph) > 100 and "lsmfm.weights.hub" in graph["lsmfm.models.backbones.base"]
    assert cycles(graph) == []
    with_cycle = {**graph, "lsmfm.weights.format": graph["lsmfm.weights.format"] | {"lsmfm.models.backbones.unet"}}
    assert cycles(with_cycle)  # the check finds one where there is one


@pytest.mark.slow
def test_every_module_imports_alone():
    """Each module imported first in a fresh interpreter (forked after the third-party imports)."""
    names = sorted(module_name(p) for p in PACKAGE.rglob("*.py"))
    code = (
        "import os, sys, importlib, traceback\n"
        "import numpy, torch, scipy, dask.array, zarr, yaml\n"
        "failed = []\n"
        "for name in sys.argv[1:]:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except BaseException:\n"
        "            traceback.print_exc()\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    if os.waitpid(pid, 0)[1] != 0:\n"
        "        failed.append(name)\n"
        "print('FAILED', failed)\n")
    out = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "FAILED []", out.stderr[-3000:]


# ---------------------------------------------------------------- files written before the registries
def test_model_folders_and_configs_written_before_the_registries_still_load():
    from safetensors.torch import load_file

    expected = load_file(str(LEGACY / "expected_outputs.safetensors"))
    x = expected["input"]
    net = lsmfm.load_pretrained(LEGACY / "backbone_unet")
    assert net.lsmfm_config.backbone == UNetConfig(channels=[4, 8], strides=[2], num_res_units=1,
                                                   out_channels=4)
    with torch.no_grad():
        assert torch.allclose(net(x), expected["backbone_unet"], atol=1e-5)
    for task in ("segment", "classify", "deblur"):
        model, config = load_task_model(LEGACY / task)
        with torch.no_grad():
            assert torch.allclose(model(x), expected[task], atol=1e-5), task
        assert config.task["threshold"] == 0.4
    assert load_task_model(LEGACY / "classify")[0].head_config.hidden == 5
    swin = ModelConfig.from_json((LEGACY / "swinunetr_config.json").read_text())
    assert swin.backbone == SwinUNETRConfig(feature_size=12, out_channels=4, norm="instance")
    assert set(to_dict(swin.backbone)) == {"arch", "in_channels", "out_channels", "axes", "input_scale",
                                           "feature_size", "norm", "use_checkpoint"}  # without the UNet's keys
    tiny = load_config(PretrainConfig, LEGACY / "pretrain_tiny_config.yaml")
    assert tiny.model.backbone == UNetConfig(channels=[8, 16, 32], strides=[2, 2], num_res_units=1,
                                             out_channels=16)
    swin_run = load_config(PretrainConfig, LEGACY / "pretrain_swinunetr_config.yaml")
    assert swin_run.model.backbone == SwinUNETRConfig(feature_size=24, out_channels=512, norm="instance",
                                                      use_checkpoint=True)
    for task in ("segment", "classify", "deblur"):
        cfg = load_config(finetune_config_class(task), LEGACY / f"finetune_{task}_config.yaml")
        assert cfg.pretrained == "unet_image_text" and isinstance(cfg.backbone, UNetConfig)


def test_old_flat_keys_are_dropped_only_at_their_old_defaults(tmp_path):
    data = json.loads((LEGACY / "segment" / "config.json").read_text())
    data["backbone"]["feature_size"] = 48  # meaningful for a SwinUNETR only: not silently ignored
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) backbone.feature_size"):
        ModelConfig.from_json((tmp_path / "config.json").read_text())


# ---------------------------------------------------------------- the README's layout section
def test_readme_layout_section_matches_the_tree():
    text = (REPO / "README.md").read_text()
    section = text.split("## Repository layout", 1)[1].split("\n## ", 1)[0]
    named = set()
    for row in re.findall(r"^\| (`.+?) \|", section, flags=re.M):
        paths = re.findall(r"`([^`]+)`", row)
        base = Path(paths[0]).parent if paths else Path()
        for i, p in enumerate(paths):
            path = Path(p) if i == 0 or "/" in p else base / p
            assert (REPO / path).exists(), f"README layout names {path}, which does not exist"
            named.add(path.as_posix().rstrip("/"))
    tops = [p for p in PACKAGE.iterdir() if p.name != "__init__.py" and p.name != "__pycache__"]
    tops += [p for p in (PACKAGE / "data").iterdir() if p.name not in ("__init__.py", "__pycache__")]
    missing = [rel for rel in (p.relative_to(REPO).as_posix() for p in tops)
               if rel not in named and not any(n.startswith(rel + "/") for n in named)]
    assert missing == [], f"README layout does not mention {missing}"
