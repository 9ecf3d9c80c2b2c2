"""`lsmfm export`: a real tiny `lsmfm pretrain` run (DeepSpeed ZeRO-2 on one CPU rank) becomes a
weights folder holding exactly the weights the engine saved, teacher or student."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from test_paper_checkpoints import TINY_UNET, assert_same_state

import lsmfm
from lsmfm.cli.main import main
from lsmfm.config import load_config, to_dict
from lsmfm.errors import ConfigError, InputError
from lsmfm.weights.card import render_model_card
from lsmfm.weights.export import export_run, run_model_config
from lsmfm.weights.format import read_model_dir

TAG = "step_00000002"
TINY = Path(__file__).resolve().parents[1] / "pretrain" / "tiny.yaml"


def synthetic_catalog(root: Path) -> Path:
    """Two small synthetic volumes (nuclei, vessels) as OME-Zarr stores, and a catalog naming them."""
    from lsmfm.data.catalog.entries import write_catalog
    from lsmfm.data.ingest.convert import ingest_array
    from lsmfm.data.synthetic.volume import generate_volume, preset_config

    entries = []
    for i, structure in enumerate(("cell_nucleus", "vessels")):
        vol = generate_volume(preset_config(structure, (32, 32, 32), seed=i))
        store = ingest_array(vol.image, vol.voxel_size, root / f"{structure}.zarr", progress=False)
        entries.append({"id": structure, "store": str(store), "descriptions": [f"synthetic {structure}"]})
    return write_catalog(root / "catalog.yaml", entries)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """Two optimizer steps of the tiny recipe with ZeRO stage 2, image-only, checkpointed at the end."""
    from lsmfm.training.pretrain import PretrainConfig, pretrain

    root = tmp_path_factory.mktemp("pretrain")
    overrides = {"data.catalogs": f"[{synthetic_catalog(root)}]", "train.max_steps": 2, "train.zero_stage": 2,
                 "train.checkpoint_every": 2, "train.image_every": 0, "train.num_threads": 1,
                 "model.use_text": "false"}
    pretrain(load_config(PretrainConfig, TINY, [f"{k}={v}" for k, v in overrides.items()]), root / "run")
    return root / "run"


def saved_backbone(run: Path, which: str) -> dict[str, torch.Tensor]:
    """The `which` backbone as the DeepSpeed engine saved its module (fp32 on CPU: the master weights)."""
    states = torch.load(run / "checkpoints" / TAG / "mp_rank_00_model_states.pt", weights_only=False)
    prefix = f"{which}.backbone."
    return {k[len(prefix):]: v for k, v in states["module"].items() if k.startswith(prefix)}


def test_export_pretrain_run_teacher_and_student(run_dir, tmp_path):
    assert (run_dir / "checkpoints" / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    teacher, student = saved_backbone(run_dir, "teacher"), saved_backbone(run_dir, "student")
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)

    out = tmp_path / "exported"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    cfg, state = read_model_dir(out)
    assert sorted(state) == sorted(teacher) and all(torch.equal(state[k], teacher[k]) for k in teacher)
    run_cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert to_dict(cfg.backbone) == run_cfg["model"]["backbone"]
    assert cfg.patch_size == run_cfg["data"]["patch_size"]
    p = cfg.pretraining
    assert (p["mode"], p["which"], p["steps"], p["zero_stage"]) == ("image_only", "teacher", 2, 2)
    assert p["data"] == [f"{run_cfg['data']['catalogs'][0]}: cell_nucleus, vessels"]
    assert "after 2 optimizer steps" in (out / "README.md").read_text()
    assert_same_state(lsmfm.load_pretrained(out), teacher)

    out_s = tmp_path / "student"
    assert main(["export", str(run_dir), "--out", str(out_s), "--which", "student", "--tag", TAG]) == 0
    assert_same_state(lsmfm.load_pretrained(out_s, which="student"), student)


def run_config() -> dict:
    return {"data": {"catalogs": ["missing/catalog.yaml"], "patch_size": [32, 32, 32],
                     "target_voxel_size": [2.0, 2.0, 2.0],
                     "normalize": {"lower": 1.0, "upper": 99.0, "clip": True, "source": "store"}},
            "model": {"backbone": to_dict(TINY_UNET), "use_text": True, "clip": {"weight": 0.5},
                      "distill": {"weight": 1.0}},
            "train": {"zero_stage": 2}}


def test_model_config_from_a_run_config(tmp_path):
    cfg = run_model_config(run_config(), tmp_path / "config.yaml", "student", tmp_path / TAG)
    assert (cfg.backbone, cfg.patch_size, cfg.voxel_size) == (TINY_UNET, [32, 32, 32], [2.0, 2.0, 2.0])
    norm = (cfg.normalize.lower, cfg.normalize.upper, cfg.pretraining["normalize_source"])
    assert norm == (1.0, 99.0, "store")
    assert (cfg.pretraining["mode"], cfg.pretraining["which"]) == ("image_text", "student")
    assert cfg.pretraining["data"] == ["missing/catalog.yaml"]  # unreadable catalog: its path is kept
    card = render_model_card(cfg, {})
    assert "image-text CLIP (loss weights: distill 1.0, clip 0.5)" in card and "2.0 x 2.0 x 2.0 µm" in card
    assert "resize" not in cfg.pretraining
    paper_like = run_config()
    paper_like["data"] |= {"read_size": [48, 48, 48], "target_voxel_size": None}
    cfg = run_model_config(paper_like, tmp_path / "config.yaml", "teacher", tmp_path / TAG)
    assert cfg.pretraining["resize"] == {"read": [48, 48, 48], "network": [32, 32, 32]}


def test_export_checks_inputs_before_reading_weights(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints" / TAG).mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(run_config()))
    assert main(["export", str(run), "--out", str(tmp_path / "o")]) == 1
    assert "no checkpoints/latest file" in capsys.readouterr().err
    with pytest.raises(InputError, match=f"{TAG}: not a DeepSpeed checkpoint .*tags here: {TAG}"):
        export_run(run, tmp_path / "o", tag=TAG)
    (run / "checkpoints" / TAG / "mp_rank_00_model_states.pt").write_bytes(b"")
    bad = run_config()
    bad["model"]["backbone"]["chanels"] = [1]
    (run / "config.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(ConfigError, match="model.backbone.chanels"):
        export_run(run, tmp_path / "o", tag=TAG)
    (tmp_path / "o").mkdir()
    with pytest.raises(InputError, match="already exists"):
        export_run(run, tmp_path / "o", tag=TAG)
