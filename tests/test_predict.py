"""Whole-volume prediction: the block plan reproduces MONAI's window grid, the out-of-core result equals
one in-memory sliding window over the whole volume, outputs are NGFF with the input's voxel size, and bad
inputs fail before anything is written."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from monai.data.utils import dense_patch_slices
from monai.inferers import sliding_window_inference
from monai.inferers.utils import _get_scan_interval

from lsmfm.cli.main import main
from lsmfm.data.normalize import NormalizeConfig, percentile_normalize
from lsmfm.errors import ConfigError, InputError, LsmfmError
from lsmfm.io.omezarr import create_level, multiscales_metadata, read_multiscales, write_ome
from lsmfm.io.volumes import read_volume
from lsmfm.models.backbones.registry import build_backbone
from lsmfm.models.backbones.unet import UNetConfig
from lsmfm.tasks import predict as predict_mod
from lsmfm.tasks.models import build_task_model, save_task_model
from lsmfm.tasks.predict import PredictOptions, axis_plan, plan_blocks, predict_volume, windows_along
from lsmfm.weights.format import ModelConfig

SHAPE = (124, 86, 94)  # mesoSPIM c5image.tif: divisible neither by the window nor by the block
ROI = 32
VOXEL = (2.0, 0.5, 0.5)
NORM = NormalizeConfig(1.0, 99.0)


def save_model(path, task="segment", head=None, classes=None, seed=0):
    torch.manual_seed(seed)
    backbone = build_backbone(UNetConfig(channels=[4, 8], strides=[2], num_res_units=0, out_channels=4))
    model = build_task_model(task, backbone, head).eval()
    if task == "segment":
        with torch.no_grad():
            model.head.weight.mul_(100)  # random features are weak: spread the probabilities over (0, 1)
    config = ModelConfig(backbone=backbone.config, patch_size=[ROI] * 3, normalize=NORM)
    save_task_model(model, path, config, class_names=classes, threshold=0.5)
    return model


def write_store(path, volume, stats=None):
    """A one-level NGFF 0.5 store laid out as `lsmfm ingest` writes it (optionally with intensity stats)."""
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    level = create_level(root, "0", (1, *volume.shape), volume.dtype, 32)
    level[0] = volume
    write_ome(root, {"multiscales": [multiscales_metadata("input", VOXEL, [], "none")]},
              extra={"lsmfm": {"intensity": [stats]}} if stats else None)
    return path


def synthetic_volume(shape=SHAPE, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    blobs = gaussian_filter((rng.random(shape) > 0.995).astype(np.float32), 2.0) * 4000
    return (100 + blobs + rng.normal(0, 20, shape)).astype(np.uint16)


def in_memory_reference(model, volume, bounds=None):
    x = percentile_normalize(volume.astype(np.float32), NORM, bounds)
    with torch.inference_mode():
        y = sliding_window_inference(torch.from_numpy(x)[None, None], [ROI] * 3, 1, model, overlap=0.25,
                                     mode="gaussian")
    return torch.sigmoid(y)[0].numpy()



@pytest.fixture(scope="module")
def seg_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "seg"
    return path, save_model(path)


def test_block_plan_reproduces_the_whole_volume_window_grid():
    """Along any axis, the windows MONAI places inside each block's read region are exactly the
    whole-volume windows touching the block's core (so blending is identical)."""
    def interval_of(roi, overlap):
        return _get_scan_interval((roi + 1,), (roi,), 1, (overlap,))[0]

    def starts(length, roi, overlap):
        size = max(length, roi)
        interval = _get_scan_interval((size,), (roi,), 1, (overlap,))
        return [s[0].start for s in dense_patch_slices((size,), (roi,), interval)]

    rng = random.Random(0)
    for _ in range(300):
        roi, overlap = rng.choice([8, 32, 96]), rng.choice([0.0, 0.25, 0.5, 0.75, 0.6])
        size, block = rng.randint(1, 300), rng.randint(roi, 260)
        plan = axis_plan(size, roi, overlap, block)
        assert plan[0][0] == 0 and plan[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
        if size <= roi:
            assert plan == [(0, size, 0, size)]
            continue
        whole = starts(size, roi, overlap)
        assert windows_along(size, roi, overlap) == len(whole)
        step = interval_of(roi, overlap)
        assert all(c0 % step == 0 for c0, *_ in plan)
        assert all(c1 - c0 <= max(block, step) for c0, c1, *_ in plan[:-1])  # the last may absorb a tail
        assert len(plan) <= math.ceil(math.ceil(size / step) / (max(block, step) // step))  # balanced: few
        for c0, c1, r0, r1 in plan:
            local = [r0 + s for s in starts(r1 - r0, roi, overlap)]
            for v in (c0, (c0 + c1) // 2, c1 - 1):
                assert {s for s in whole if s <= v < s + roi} == {s for s in local if s <= v < s + roi}


def test_block_cores_are_balanced_and_fewest():
    """A 256-voxel block covers a 256 axis in one core (not 240 + a 16-voxel tail rerunning a halo), and
    512 splits into 3 balanced cores of <= 256 on the 48-voxel window grid."""
    assert axis_plan(256, 64, 0.25, 256) == [(0, 256, 0, 256)]
    assert [(c0, c1) for c0, c1, *_ in axis_plan(512, 64, 0.25, 256)] == [(0, 144), (144, 336), (336, 512)]


def test_prediction_equals_in_memory_sliding_window(tmp_path, seg_model):
    model_dir, model = seg_model
    volume = synthetic_volume()
    src = write_store(tmp_path / "in.zarr", volume)
    out = tmp_path / "pred.zarr"
    summary = predict_volume(model_dir, src, out, PredictOptions(block=72, overlap=0.25), progress=False)
    assert summary["blocks"] == 2 * 2 * 2 and summary["bounds_source"] == "subsample"
    regions = [tuple(r.stop - r.start for r in b.region) for b in plan_blocks(SHAPE, (ROI,) * 3, 0.25, 72)]
    assert summary["windows"] == sum(len(dense_patch_slices(r, (ROI,) * 3, (24,) * 3)) for r in regions)
    assert summary["windows_one_pass"] == len(dense_patch_slices(SHAPE, (ROI,) * 3, (24,) * 3))
    prob = zarr.open_array(str(out / "0"), mode="r")[:]
    assert prob.shape == (1, *SHAPE) and prob.dtype == np.float32
    ref = in_memory_reference(model, volume)
    assert ref.std() > 0.1 and 0.1 < (ref > 0.5).mean() < 0.9  # a non-trivial prediction to compare
    np.testing.assert_allclose(prob, ref, atol=1e-5)
    mask = zarr.open_array(str(out / "labels/mask/0"), mode="r")[:]
    np.testing.assert_array_equal(mask, (prob > 0.5).astype(np.uint8))
    root = zarr.open_group(str(out), mode="r")
    assert read_multiscales(root, out).voxel_sizes == [VOXEL]
    assert root.attrs["ome"]["version"] == "0.5" and root["labels"].attrs["ome"]["labels"] == ["mask"]
    assert read_multiscales(root["labels/mask"], out).voxel_sizes == [VOXEL]
    assert root.attrs["lsmfm"]["prediction"]["task"] == "segment"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "pred.zarr"]  # no .partial left


def test_store_statistics_set_the_normalisation(tmp_path, seg_model):
    model_dir, model = seg_model
    volume = synthetic_volume((40, 36, 44), seed=1)
    stats = {"percentiles": {"0.5": 90.0, "1": 95.0, "50": 100.0, "99": 150.0, "99.5": 400.0}}
    src = write_store(tmp_path / "in.zarr", volume, stats)
    summary = predict_volume(model_dir, src, tmp_path / "p.zarr", PredictOptions(block=32, threshold=0.6),
                             progress=False)
    assert summary["bounds_source"] == "store" and summary["bounds"] == [[95.0, 150.0]]
    prob = zarr.open_array(str(tmp_path / "p.zarr/0"), mode="r")[:]
    np.testing.assert_allclose(prob, in_memory_reference(model, volume, (95.0, 150.0)), atol=1e-5)
    mask = zarr.open_array(str(tmp_path / "p.zarr/labels/mask/0"), mode="r")[:]
    np.testing.assert_array_equal(mask, (prob > 0.6).astype(np.uint8))


def test_untrained_deblur_model_restores_the_clipped_input(tmp_path):
    save_model(tmp_path / "deblur", task="deblur")
    volume = synthetic_volume((40, 36, 44), seed=2)
    src = tmp_path / "in.tif"
    import tifffile

    tifffile.imwrite(src, volume)
    summary = predict_volume(tmp_path / "deblur", src, tmp_path / "d.zarr", PredictOptions(block=32),
                             progress=False)
    lo, hi = summary["bounds"][0]
    restored = zarr.open_array(str(tmp_path / "d.zarr/0"), mode="r")[0]
    # zero-initialised residual head: output = normalised input, mapped back to intensity units
    np.testing.assert_allclose(restored, np.clip(volume, lo, hi), rtol=1e-5, atol=1e-3)
    assert not (tmp_path / "d.zarr/labels").exists()


def test_bad_requests_fail_before_writing(tmp_path, seg_model):
    model_dir, _ = seg_model
    src = write_store(tmp_path / "in.zarr", synthetic_volume((40, 36, 44)))
    out = tmp_path / "out.zarr"
    save_model(tmp_path / "cls", task="classify", head={"n_classes": 2}, classes=["a", "b"])
    with pytest.raises(InputError, match="classify model"):
        predict_volume(tmp_path / "cls", src, out, progress=False)
    with pytest.raises(ConfigError, match="smaller than the model's patch size"):
        predict_volume(model_dir, src, out, PredictOptions(block=16), progress=False)
    two = zarr.open_group(str(tmp_path / "two.zarr"), mode="w", zarr_format=3)
    create_level(two, "0", (2, 40, 36, 44), "uint16", 32)
    write_ome(two, {"multiscales": [multiscales_metadata("two", VOXEL, [], "none")]})
    with pytest.raises(InputError, match="2 channel"):
        predict_volume(model_dir, tmp_path / "two.zarr", out, progress=False)
    config = json.loads((model_dir / "config.json").read_text())
    config["patch_size"] = [31, 32, 32]  # not a multiple of the UNet's 2
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd/config.json").write_text(json.dumps(config))
    (tmp_path / "odd/model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    with pytest.raises(LsmfmError, match="patch_size"):
        predict_volume(tmp_path / "odd", src, out, progress=False)
    assert not out.exists() and not (tmp_path / "out.zarr.partial").exists()
    out.mkdir()
    with pytest.raises(InputError, match="already exists"):
        predict_volume(model_dir, src, out, progress=False)


def test_failure_midway_leaves_nothing(tmp_path, seg_model, monkeypatch):
    model_dir, _ = seg_model
    src = write_store(tmp_path / "in.zarr", synthetic_volume((70, 36, 44)))
    real, calls = predict_mod.predict_block, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_mod, "predict_block", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        predict_volume(model_dir, src, tmp_path / "p.zarr", PredictOptions(block=32), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]


def test_cli(tmp_path, seg_model, capsys):
    model_dir, _ = seg_model
    src = write_store(tmp_path / "in.zarr", synthetic_volume((40, 36, 44)))
    args = ["predict", "--model", str(model_dir), "--input", str(src), "--out", str(tmp_path / "p.zarr"),
            "--block", "32", "--quiet", "--json", str(tmp_path / "s.json")]
    assert main(args) == 0
    assert "segment: 40x36x44 voxels in 8 blocks" in capsys.readouterr().out
    assert (tmp_path / "p.zarr/labels/mask/0").is_dir() and (tmp_path / "s.json").is_file()
    assert main(args) == 1  # --out exists: a one-line error, no traceback
    assert "already exists" in capsys.readouterr().err


def test_prediction_process_never_imports_transformers(tmp_path, seg_model):
    """MONAI is imported without transformers (about 100 MiB and 2 s of imports) when predicting."""
    src = write_store(tmp_path / "in.zarr", synthetic_volume((40, 36, 44)))
    code = ("import sys; from lsmfm.cli.main import main; rc = main(sys.argv[1:]); "
            "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'deepspeed'}))")
    args = ["predict", "--model", str(seg_model[0]), "--input", str(src), "--out", str(tmp_path / "p.zarr"),
            "--block", "32", "--quiet", "--device", "cpu"]
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "0 []"


@pytest.mark.shared
def test_real_mesospim_volume(tmp_path, seg_model, shared_data):
    model_dir, model = seg_model
    src = shared_data / "mesospim_nuclei_unlabelled" / "c5image.tif"
    volume, _ = read_volume(src)
    assert volume.shape == SHAPE
    summary = predict_volume(model_dir, src, tmp_path / "p.zarr", PredictOptions(block=64), progress=False)
    assert summary["blocks"] == 3 * 2 * 2  # 124 = 48 + 48 + 28: fewest balanced cores <= 64 on the 24 grid
    prob = zarr.open_array(str(tmp_path / "p.zarr/0"), mode="r")[0]
    np.testing.assert_allclose(prob, in_memory_reference(model, volume)[0], atol=1e-5)


SLOW_BLOCKS = """
import sys, time
from lsmfm.tasks import predict
real = predict.predict_block
predict.predict_block = lambda *a, **k: (time.sleep(0.5), real(*a, **k))[1]
from lsmfm.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def test_two_predicts_to_one_out_the_second_is_refused(tmp_path, seg_model):
    """The second writer is refused at once while the first runs; the first finishes a correct store."""
    model_dir, model = seg_model
    volume = synthetic_volume((64, 64, 64))
    src = write_store(tmp_path / "in.zarr", volume)
    out = tmp_path / "same.zarr"
    args = ["predict", "--model", str(model_dir), "--input", str(src), "--out", str(out), "--block", "32",
            "--quiet"]
    first = subprocess.Popen([sys.executable, "-c", SLOW_BLOCKS, *args], stderr=subprocess.PIPE, text=True)
    lock_file = tmp_path / "same.zarr.lock"
    while not lock_file.exists() and first.poll() is None:
        time.sleep(0.02)
    second = subprocess.run([sys.executable, "-m", "lsmfm.cli.main", *args], capture_output=True, text=True,
                            timeout=300)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 1
    assert f"same.zarr: in use by lsmfm predict (pid {first.pid} on " in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    prob = zarr.open_array(str(out / "0"), mode="r")[0]
    np.testing.assert_allclose(prob, in_memory_reference(model, volume)[0], atol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr", "same.zarr"]
