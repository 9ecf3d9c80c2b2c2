"""Checkpoints lsmfm did not write are read without running code: a pickle calling `os.system` in a run
folder is refused by `lsmfm export` and `lsmfm pretrain --resume` and its command never runs; real
ZeRO-0/1/2 checkpoints still export and resume exactly through the same weights-only loader; checkpoint
tags cannot leave the run folder; a model folder's symlinked weights need an explicit option; a damaged
latest checkpoint falls back to the newest intact one, saying so."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from pretrain_helpers import TINY, synthetic_catalog, tiny_overrides

import lsmfm
from lsmfm.cli.main import main
from lsmfm.config import load_config
from lsmfm.errors import InputError, LsmfmWarning
from lsmfm.training import checkpoint
from lsmfm.training.pretrain import PretrainConfig, pretrain
from lsmfm.weights.export import export_run
from lsmfm.weights.torchfile import UnsafeCheckpointError, load_torch_file

TAG = "step_00000002"
STATES = "mp_rank_00_model_states.pt"


class Payload:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def overrides(catalog: Path, stage: int, steps: int = 2) -> list[str]:
    return tiny_overrides(catalog, steps, **{"train.zero_stage": stage, "train.checkpoint_every": 2,
                                             "train.image_every": 0, "model.use_text": "false",
                                             "train.keep_checkpoints": 0})


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, tuple[Path, list[str]]]:
    """Two checkpointed steps of the tiny recipe for ZeRO stages 0, 1 and 2."""
    root = tmp_path_factory.mktemp("zero")
    catalog = synthetic_catalog(root, size=32)
    out = {}
    for stage in (0, 1, 2):
        args = overrides(catalog, stage)
        pretrain(load_config(PretrainConfig, TINY, args), root / f"zero{stage}", progress=False)
        out[stage] = (root / f"zero{stage}", args)
    return out


def copy_run(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def plant_payload(run: Path, marker: Path) -> None:
    states = run / "checkpoints" / TAG / STATES
    good = load_torch_file(states, deepspeed=True)  # memory-mapped: write the new file aside first
    torch.save({**good, "client_note": Payload(marker)}, states.with_suffix(".new"))
    os.replace(states.with_suffix(".new"), states)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_zero_checkpoints_export_and_resume_exactly_weights_only(runs, tmp_path, stage):
    run, args = runs[stage]
    files = sorted((run / "checkpoints" / TAG).glob("*.pt"))
    assert len(files) == (1 if stage == 0 else 2)
    saved = load_torch_file(run / "checkpoints" / TAG / STATES, deepspeed=True)["module"]
    prefix = "teacher.backbone."
    teacher = {k.removeprefix(prefix): v for k, v in saved.items() if k.startswith(prefix)}
    out = export_run(run, tmp_path / "exported")
    got = lsmfm.load_pretrained(out).state_dict()
    assert sorted(got) == sorted(teacher) and all(torch.equal(got[k], teacher[k]) for k in teacher)

    from lsmfm.training import distributed
    from lsmfm.training.pretrain import Trainer

    cfg = load_config(PretrainConfig, TINY, args)
    device = torch.device("cpu")
    env = distributed.init(device)
    try:
        trainer = Trainer(cfg, copy_run(run, tmp_path / "resumed"), env, device, resume=True, progress=False)
        trainer.log.close()
        assert trainer.step == 2 and trainer.model.teacher_updates == 2
        now = trainer.model.state_dict()
        assert all(torch.equal(now[k], v) for k, v in saved.items())
        if stage:
            optim = load_torch_file(files[-1], deepspeed=True)["optimizer_state_dict"]
            flat = trainer.engine.optimizer.single_partition_of_fp32_groups
            assert all(torch.equal(a, b) for a, b in zip(flat, optim["single_partition_of_fp32_groups"]))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_pickled_code_in_a_run_folder_is_refused_by_export_and_resume(runs, tmp_path, capsys):
    run, args = runs[2]
    evil = copy_run(run, tmp_path / "evil")
    marker = tmp_path / "pwned"
    plant_payload(evil, marker)
    assert main(["export", str(evil), "--out", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert f"{STATES}: refused: the pickle references posix.system" in err
    assert not (tmp_path / "w").exists()
    with pytest.raises(UnsafeCheckpointError, match="posix.system"):
        pretrain(load_config(PretrainConfig, TINY, args), evil, resume=True, progress=False)
    assert main(["pretrain", "--config", str(TINY), "--out", str(evil), "--resume", "--quiet", *args]) == 1
    assert "refused" in capsys.readouterr().err
    assert not marker.exists()
    assert (evil / "checkpoints" / TAG).is_dir()  # an attack is not "damage": nothing is set aside


def test_deepspeed_loaders_are_weights_only_inside_no_pickled_code(tmp_path):
    """DeepSpeed calls torch.load(weights_only=False); inside no_pickled_code the payload never runs."""
    from lsmfm.weights.torchfile import no_pickled_code

    marker = tmp_path / "pwned"
    path = tmp_path / STATES
    torch.save({"module": {}, "x": Payload(marker)}, path)
    with pytest.raises(UnsafeCheckpointError, match=f"{STATES}: refused.*posix.system"):
        with no_pickled_code([path]):
            torch.load(path, weights_only=False)
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_checkpoint_tags_cannot_leave_the_run_folder(tmp_path):
    other = tmp_path / "other_run" / "checkpoints" / TAG
    other.mkdir(parents=True)
    torch.save({"module": {}}, other / STATES)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text(f"../../other_run/checkpoints/{TAG}")
    with pytest.raises(InputError, match=r"latest: checkpoint tag '\.\./\.\./other_run.*not a plain folder"):
        export_run(run, tmp_path / "w")
    with pytest.raises(InputError, match="not a plain folder name"):
        checkpoint.resume_tag(run)
    with pytest.raises(InputError, match="not a plain folder name"):
        export_run(run, tmp_path / "w", tag="../../x")
    (run / "checkpoints" / TAG).symlink_to(other)
    (run / "checkpoints" / "latest").write_text(TAG)
    for call in (lambda: export_run(run, tmp_path / "w"), lambda: checkpoint.resume_tag(run),
                 lambda: export_run(run, tmp_path / "w", tag=TAG)):
        with pytest.raises(InputError, match=f"tag '{TAG}' leads outside the run folder"):
            call()
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(runs, tmp_path):
    run = copy_run(runs[0][0], tmp_path / "run")
    root = run / "checkpoints"
    newer = root / "step_00000004"
    newer.mkdir()
    data = (root / TAG / STATES).read_bytes()
    (newer / STATES).write_bytes(data[: len(data) // 3])  # a disk that filled up mid-copy
    (root / "latest").write_text(newer.name)
    catalog = load_config(PretrainConfig, TINY, runs[0][1]).data.catalogs[0]
    cfg = load_config(PretrainConfig, TINY, overrides(Path(catalog), 0, steps=3))
    with pytest.warns(LsmfmWarning, match=r"step_00000004 is unreadable \(mp_rank_00_model_states.pt: not a "
                                          r"readable PyTorch checkpoint.*resuming from the newest intact "
                                          rf"checkpoint {TAG}"):
        metrics = pretrain(cfg, run, resume=True, progress=False)
    assert metrics["step"] == 3 and metrics["teacher_updates"] == 3
    assert (root / "latest").read_text() == "step_00000003"
    assert (root / "broken_step_00000004" / STATES).is_file() and not newer.exists()
    for tag in (TAG, "step_00000003"):
        (root / tag / STATES).write_bytes(os.urandom(4096))
    with pytest.raises(InputError, match="no intact checkpoint to resume: step_00000003 is unreadable"):
        checkpoint.resume_tag(run)


def test_random_bytes_are_called_corrupt_not_code(tmp_path):
    path = tmp_path / "noise.ckpt"
    path.write_bytes(os.urandom(5000))
    with pytest.raises(InputError) as err:
        lsmfm.load_pretrained(path)
    assert "not a readable PyTorch checkpoint" in str(err.value) and "refused" not in str(err.value)
    assert not isinstance(err.value, UnsafeCheckpointError)


def test_symlinked_weights_leading_outside_a_model_folder_need_an_option(tmp_path):
    from test_paper_checkpoints import TINY_UNET

    from lsmfm.models.backbones.registry import build_backbone

    real = build_backbone(TINY_UNET).save_pretrained(tmp_path / "real")
    shared = tmp_path / "shared"
    shared.mkdir()
    shutil.copy(real / "config.json", shared / "config.json")
    (shared / "model.safetensors").symlink_to(real / "model.safetensors")
    with pytest.raises(InputError, match=r"model.safetensors: is a symlink to .*real/model.safetensors, "
                                         "outside the model folder; refused"):
        lsmfm.load_pretrained(shared)
    assert lsmfm.load_pretrained(shared, follow_symlinks=True).config == TINY_UNET
    inside = tmp_path / "inside"
    inside.mkdir()
    shutil.copy(real / "model.safetensors", inside / "weights-v1.safetensors")
    shutil.copy(real / "config.json", inside / "config.json")
    (inside / "model.safetensors").symlink_to("weights-v1.safetensors")  # within the folder: fine
    assert lsmfm.load_pretrained(inside).config == TINY_UNET
