"""The spine: typed configs with overrides, atomic writes, few-shot bookkeeping, metrics conventions."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pytest

from lsmfm.cli.main import main
from lsmfm.config import load_config, save_config
from lsmfm.errors import ConfigError, InputError
from lsmfm.io.atomic import atomic_dir, atomic_write_text
from lsmfm.metrics.segmentation import dice_score, iou_score
from lsmfm.tasks.results import fewshot_subset, format_table, plot_metrics, write_results


@dataclass
class _Train:
    max_steps: int = 10
    lr: float = 1e-3


@dataclass
class _Cfg:
    mode: Literal["a", "b"] = "a"
    shots: list[int] = field(default_factory=lambda: [1, 2])
    train: _Train = field(default_factory=_Train)
    pretrained: str | None = None


@pytest.mark.parametrize("module", ["lsmfm.losses.segmentation", "lsmfm.models.backbones.unet"])
def test_monai_never_pulls_in_transformers(module):
    """Whichever lsmfm module imports MONAI first, MONAI's Transchex does not import transformers."""
    code = f"import sys, {module}; print('monai' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_config_file_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("mode: b\ntrain:\n  lr: 0.5\n")
    cfg = load_config(_Cfg, f, ["train.max_steps=3", "shots=[1,4]", "train.lr=1e-4"])
    assert cfg == _Cfg(mode="b", shots=[1, 4], train=_Train(max_steps=3, lr=1e-4))
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(_Cfg, tmp_path / "resolved.yaml") == cfg


@pytest.mark.parametrize("override, fragment", [
    ("train.max_stepz=3", "train.max_stepz"),
    ("mode=c", "mode must be one of"),
    ("train.max_steps=abc", "train.max_steps must be an integer"),
    ("novalue", "key=value"),
])
def test_config_errors_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(_Cfg, None, [override])


def test_invalid_yaml_is_one_line_with_where(tmp_path):
    """PyYAML's messages span lines (with a caret drawing); the CLI prints one line per error."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 1\n max_steps: 2\n")
    with pytest.raises(ConfigError) as err:
        load_config(_Cfg, bad)
    assert str(err.value).startswith(f"{bad}: not valid YAML: ") and "at line 3, column" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(_Cfg, None, ["shots=[1,2"])
    assert str(err.value).startswith("override 'shots=[1,2': the value is not valid YAML: ")
    assert "\n" not in str(err.value)


def test_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(_Cfg, tmp_path / "nope.yaml")


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            atomic_write_text(tmp / "a.txt", "x")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_empty_mask_convention():
    empty = np.zeros((4, 4, 4), bool)
    full = np.ones((4, 4, 4), bool)
    assert dice_score(empty, empty) == 1.0 and iou_score(empty, empty) == 1.0
    assert dice_score(full, empty) == 0.0 and iou_score(full, empty) == 0.0
    half = full.copy()
    half[:2] = False
    assert dice_score(half, full) == pytest.approx(2 * 32 / (32 + 64))
    assert iou_score(half, full) == pytest.approx(0.5)


def test_fewshot_subsets_nested_and_bounded():
    assert fewshot_subset(10, 2, seed=0) == fewshot_subset(10, 2, seed=0)
    assert set(fewshot_subset(10, 2, seed=1)) <= set(fewshot_subset(10, 4, seed=1))
    with pytest.raises(InputError, match="8 shots requested but only 3"):
        fewshot_subset(3, 8, seed=0)


def test_results_csv_json_and_plot(tmp_path):
    rows = [{"shots": s, "seed": seed, "init": init, "dice": 0.1 * s + 0.01 * seed + (0.2 if init == "pretrained" else 0)}
            for s in (1, 2) for seed in (0, 1) for init in ("pretrained", "scratch")]
    write_results(tmp_path, rows, ["dice"])
    with open(tmp_path / "results.csv") as fh:
        table = list(csv.DictReader(fh))
    assert len(table) == 8 and list(table[0]) == ["shots", "seed", "init", "dice"]
    summary = json.loads((tmp_path / "metrics.json").read_text())["summary"]
    pre1 = next(e for e in summary if e["init"] == "pretrained" and e["shots"] == 1)
    assert pre1["dice"]["mean"] == pytest.approx(0.305)
    assert "0.305" in format_table(rows, ["dice"])
    (png,) = plot_metrics(tmp_path, rows, ["dice"])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "ingest" in capsys.readouterr().out


def test_overrides_accepted_after_options(tmp_path, monkeypatch):
    import argparse

    from lsmfm.cli.main import parse_with_overrides

    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("overrides", nargs="*")
    args = parse_with_overrides(parser, ["a.b=1", "--out", "x", "c=2", "d.e=[1,2]"])
    assert args.out == "x" and args.overrides == ["a.b=1", "c=2", "d.e=[1,2]"]
    with pytest.raises(SystemExit):
        parse_with_overrides(parser, ["--out", "x", "--bogus"])


def test_replace_dir_swaps_only_when_complete(tmp_path):
    from lsmfm.io.atomic import replace_dir

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "new.txt").write_text("new")
    replace_dir(tmp_path / "new", tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_resolve_device(monkeypatch):
    import torch

    from lsmfm.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="device=cuda:1 but CUDA is not available"):
        resolve_device("cuda:1")


def test_normalize_channels_scales_each_channel_on_its_own():
    from lsmfm.data.normalize import NormalizeConfig, normalize_channels

    image = np.stack([np.arange(100, dtype=np.uint16).reshape(1, 10, 10),
                      1000 + 10 * np.arange(100, dtype=np.uint16).reshape(1, 10, 10)])
    out = normalize_channels(image, NormalizeConfig(lower=0.0, upper=100.0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)
    assert out.min() == 0.0 and out.max() == 1.0
    fixed = normalize_channels(image, NormalizeConfig(), bounds=[(0.0, 198.0), (1000.0, 1990.0)])
    np.testing.assert_allclose(fixed[0, 0, 0, :2], [0.0, 1 / 198], rtol=1e-6)
    np.testing.assert_allclose(fixed[1, 0, 0, :2], [0.0, 10 / 990], rtol=1e-6)
