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
from lsmfm.errors import ConfigError, InputError, LsmfmError, LsmfmWarning
from lsmfm.io.omezarr import create_level, multiscales_metadata, read_multiscales, write_ome
from lsmfm.io.volumes import read_volume
from lsmfm.models.backbones.registry import build_backbone
from lsmfm.models.backbones.unet import UNetConfig
from lsmfm.tasks import predict as predict_mod
from lsmfm.tasks.models import build_task_model, save_task_model
from lsmfm.tasks.blocks import axis_plan, output_grid, plan_blocks, windows_along
from lsmfm.tasks.predict import PredictOptions, predict_volume
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
    whole-volume windows touching the block's core (so blending is identical), and cores are the fewest
    balanced runs of whole shards (`unit`) of at most `block` voxels."""
    def starts(length, roi, overlap):
        size = max(length, roi)
        interval = _get_scan_interval((size,), (roi,), 1, (overlap,))
        return [s[0].start for s in dense_patch_slices((size,), (roi,), interval)]

    rng = random.Random(0)
    for _ in range(400):
        roi, overlap = rng.choice([8, 32, 96]), rng.choice([0.0, 0.25, 0.5, 0.75, 0.6])
        size, block = rng.randint(1, 300), rng.randint(roi, 260)
        unit = rng.choice([u for u in (8, 16, 32, 64, 128) if u <= block])
        plan = axis_plan(size, roi, overlap, block, unit)
        assert plan[0][0] == 0 and plan[-1][1] == size
        assert all(a[1] == b[0] for a, b in zip(plan, plan[1:]))
        if size <= roi:
            assert plan == [(0, size, 0, size)]
            continue
        whole = starts(size, roi, overlap)
        assert windows_along(size, roi, overlap) == len(whole)
        assert all(c0 % unit == 0 for c0, *_ in plan)  # every block writes whole shards
        assert all(c1 - c0 <= block for c0, c1, *_ in plan)
        assert len(plan) == math.ceil(math.ceil(size / unit) / (block // unit))  # the fewest
        for c0, c1, r0, r1 in plan:
            local = [r0 + s for s in starts(r1 - r0, roi, overlap)]
            assert {s for s in whole if s < c1 and s + roi > c0} == set(local)
            for v in (c0, (c0 + c1) // 2, c1 - 1):
                assert {s for s in whole if s <= v < s + roi} == {s for s in local if s <= v < s + roi}


def test_block_cores_are_balanced_whole_shards():
    """512 voxels in 256-voxel shards: 2 cores; 600 in 64-voxel shards, block 256: 3 balanced cores of
    3, 3 and 4 shards (the last one partial), not 4 + 4 + 2."""
    assert [(c0, c1) for c0, c1, *_ in axis_plan(512, 64, 0.25, 256, 256)] == [(0, 256), (256, 512)]
    assert [(c0, c1) for c0, c1, *_ in axis_plan(600, 64, 0.25, 256, 64)] == [(0, 192), (192, 384),
                                                                               (384, 600)]
    assert axis_plan(256, 64, 0.25, 256, 256) == [(0, 256, 0, 256)]
    assert output_grid(256, 64, 4) == (64, 256) and output_grid(72, 64, 4) == (64, 64)
    assert output_grid(32, 64, 4) == (32, 32) and output_grid(1024, 64, 4) == (64, 256)


def test_prediction_equals_in_memory_sliding_window(tmp_path, seg_model):
    model_dir, model = seg_model
    volume = synthetic_volume()
    src = write_store(tmp_path / "in.zarr", volume)
    out = tmp_path / "pred.zarr"
    summary = predict_volume(model_dir, src, out, PredictOptions(block=72, overlap=0.25), progress=False)
    assert summary["blocks"] == 2 * 2 * 2 and summary["bounds_source"] == "subsample"
    regions = [tuple(r.stop - r.start for r in b.region) for b in plan_blocks(SHAPE, (ROI,) * 3, 0.25, 72, 64)]
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
    pyramid = [VOXEL, (2.0, 1.0, 1.0), (2.0, 2.0, 2.0), (4.0, 4.0, 4.0)]
    assert read_multiscales(root, out).voxel_sizes == pyramid
    assert root.attrs["ome"]["version"] == "0.5" and root["labels"].attrs["ome"]["labels"] == ["mask"]
    assert read_multiscales(root["labels/mask"], out).voxel_sizes == pyramid
    half = prob[:, :, :86 // 2 * 2, :94 // 2 * 2].reshape(1, 124, 43, 2, 47, 2)
    np.testing.assert_allclose(root["1"][:], half.mean(axis=(3, 5)), rtol=1e-6)  # probabilities: mean
    np.testing.assert_array_equal(root["labels/mask/1"][:], (half > 0.5).max(axis=(3, 5)))  # masks: max
    assert root.attrs["ome"]["omero"]["channels"][0]["window"] == {"min": 0.0, "max": 1.0, "start": 0.0,
                                                                   "end": 1.0}
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


def test_failure_midway_keeps_finished_blocks_for_a_resume(tmp_path, seg_model, monkeypatch):
    """A failure in the first block leaves nothing; a failure later keeps the finished blocks (with a
    warning) and the same call then runs only the rest, to the uninterrupted result."""
    model_dir, _ = seg_model
    src = write_store(tmp_path / "in.zarr", synthetic_volume((70, 36, 44)))
    real, calls = predict_mod.predict_block, []

    def failing_at(n):
        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise RuntimeError("simulated crash")
            return real(*args, **kwargs)
        return failing

    opts = PredictOptions(block=32)
    monkeypatch.setattr(predict_mod, "predict_block", failing_at(1))
    with pytest.raises(RuntimeError, match="simulated"):
        predict_volume(model_dir, src, tmp_path / "p.zarr", opts, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zarr"]
    calls.clear()
    monkeypatch.setattr(predict_mod, "predict_block", failing_at(3))
    with pytest.warns(LsmfmWarning, match="its 2 finished block\\(s\\) are kept"), \
            pytest.raises(RuntimeError, match="simulated"):
        predict_volume(model_dir, src, tmp_path / "p.zarr", opts, progress=False)
    assert (tmp_path / "p.zarr.partial").is_dir() and not (tmp_path / "p.zarr").exists()
    monkeypatch.setattr(predict_mod, "predict_block", real)
    summary = predict_volume(model_dir, src, tmp_path / "p.zarr", opts, progress=False)
    assert summary["blocks_resumed"] == 2 and summary["blocks_run"] == summary["blocks"] - 2
    whole = predict_volume(model_dir, src, tmp_path / "whole.zarr", opts, progress=False)
    assert whole["blocks_resumed"] == 0
    for level in ("0", "1", "labels/mask/0"):
        np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "p.zarr" / level))[:],
                                      zarr.open_array(str(tmp_path / "whole.zarr" / level))[:])


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


def test_prediction_honours_the_recorded_axes_and_scale(tmp_path):
    """A model kept from a paper checkpoint finetuned at `scale: pretraining` (axes xyz, input scale 2/3,
    the teacher with re-estimated BatchNorm statistics): the prediction is the raw MONAI network's sliding
    window on windows resized to the pretraining scale and transposed to (x, y, z), and says so."""
    import dataclasses

    import torch.nn.functional as F
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    plain = UNetConfig(channels=[4, 8], strides=[2], num_res_units=0, out_channels=4)
    recorded = dataclasses.replace(plain, axes="xyz", input_scale=2 / 3)
    model = build_task_model("segment", build_backbone(recorded), None).eval()
    with torch.no_grad():
        model.head.weight.mul_(100)
    started = {"which": "teacher", "batchnorm": {"reestimated_on": "4 windows of (24, 24, 24) voxels"}}
    config = ModelConfig(backbone=recorded, patch_size=[24] * 3, normalize=NORM, pretraining=started)
    save_task_model(model, tmp_path / "model", config, threshold=0.5)
    raw = UNet(**plain.monai_network()[1]).eval()
    raw.load_state_dict(model.backbone.state_dict())

    def paper_way(w: torch.Tensor) -> torch.Tensor:
        small = F.interpolate(w, size=(16, 16, 16), mode="trilinear", align_corners=False)
        dense = raw(small.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        return model.head(F.interpolate(dense, size=w.shape[2:], mode="trilinear", align_corners=False))

    volume = synthetic_volume((40, 30, 36))
    src = write_store(tmp_path / "in.zarr", volume)
    summary = predict_volume(tmp_path / "model", src, tmp_path / "p.zarr", PredictOptions(block=32),
                             progress=False)
    assert summary["model_reads"] == {"axes": "xyz", "input_scale": 2 / 3, **started}
    prob = zarr.open_array(str(tmp_path / "p.zarr/0"), mode="r")[0]
    x = percentile_normalize(volume.astype(np.float32), NORM, summary["bounds"][0])
    with torch.inference_mode():
        want = torch.sigmoid(sliding_window_inference(torch.from_numpy(x)[None, None], [24] * 3, 1, paper_way,
                                                      overlap=0.25, mode="gaussian"))[0, 0].numpy()
        native = torch.sigmoid(sliding_window_inference(torch.from_numpy(x)[None, None], [24] * 3, 1,
                                                        lambda w: model.head(raw(w)), overlap=0.25,
                                                        mode="gaussian"))[0, 0].numpy()
    assert want.std() > 0.05 and np.abs(native - want).max() > 0.1  # the recorded reading matters
    np.testing.assert_allclose(prob, want, atol=1e-5)
    meta = zarr.open_group(str(tmp_path / "p.zarr"), mode="r").attrs["lsmfm"]["prediction"]
    assert meta["model_reads"] == summary["model_reads"]


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
    assert summary["blocks"] == 2 * 2 * 2  # 124 = 64 + 60: cores of whole 64³ shards
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
    volume = synthetic_volume((96, 96, 96))  # 27 blocks of 32³, 0.5 s each: the second starts meanwhile
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


def test_nan_inf_input_voxels_are_masked_with_a_warning_naming_the_count(tmp_path, seg_model, capsys):
    """Two NaN and one Inf voxel: not an all-NaN prediction; they enter as the lower bound, come out as 0,
    the rest of the volume is predicted as if they held that value, and the warning counts them."""
    model_dir, model = seg_model
    volume = synthetic_volume((40, 36, 44)).astype(np.float32)
    bad = [(3, 4, 5), (20, 30, 40), (39, 0, 0)]
    with_nan = volume.copy()
    for (z, y, x), v in zip(bad, [np.nan, np.nan, np.inf]):
        with_nan[z, y, x] = v
    src = write_store(tmp_path / "nan.zarr", with_nan)
    args = ["predict", "--model", str(model_dir), "--input", str(src), "--out", str(tmp_path / "p.zarr"),
            "--block", "32", "--quiet", "--json", str(tmp_path / "s.json")]
    assert main(args) == 0
    assert "3 NaN/Inf input voxel(s) were predicted as their channel's lower normalisation bound and " \
           "written as 0" in capsys.readouterr().err
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["nonfinite_voxels"] == 3
    prob = zarr.open_array(str(tmp_path / "p.zarr/0"), mode="r")[0]
    assert np.isfinite(prob).all() and all(prob[p] == 0 for p in bad)
    lo = summary["bounds"][0][0]
    filled = with_nan.copy()
    filled[~np.isfinite(filled)] = lo
    ref = in_memory_reference(model, filled, tuple(summary["bounds"][0]))[0]
    for p in bad:
        ref[p] = 0
    np.testing.assert_allclose(prob, ref, atol=1e-5)


def test_truncated_nifti_input_is_one_line(tmp_path, seg_model, capsys):
    from lsmfm.data.synthetic.write import write_nifti

    write_nifti(tmp_path / "v.nii.gz", synthetic_volume((40, 36, 44)), VOXEL)
    data = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(data[: len(data) // 2])
    out = tmp_path / "p.zarr"
    assert main(["predict", "--model", str(seg_model[0]), "--input", str(tmp_path / "t.nii.gz"), "--out",
                 str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "t.nii.gz: corrupt or truncated gzip stream" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.nii.gz", "v.nii.gz"]


@pytest.mark.parametrize("imagej", [True, False])
def test_truncated_tiff_input_is_one_line(tmp_path, seg_model, capsys, imagej):
    """A TIFF cut short (a copy that stopped) is named as truncated, not as "a 2D image"."""
    import tifffile

    from lsmfm.data.synthetic.write import write_tiff

    volume, path = synthetic_volume((40, 36, 44)), tmp_path / "v.tif"
    write_tiff(path, volume, VOXEL) if imagej else tifffile.imwrite(path, volume)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    out = tmp_path / "p.zarr"
    assert main(["predict", "--model", str(seg_model[0]), "--input", str(path), "--out", str(out),
                 "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{path}: truncated " in err or f"{path}: truncated or corrupt TIFF" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.tif"]


def test_a_full_disk_midway_is_one_line_and_the_same_command_resumes(tmp_path, seg_model, monkeypatch, capsys):
    """ENOSPC from the store after some blocks: one line naming the output, the finished blocks kept (with
    a warning), and once there is space the same command runs only the rest, to the uninterrupted result."""
    import errno

    from zarr.storage import LocalStore

    model_dir, _ = seg_model
    src = write_store(tmp_path / "in.zarr", synthetic_volume((70, 36, 44)))
    real, writes = LocalStore.set, []

    async def filling(self, key, value, *args, **kwargs):
        if (key.startswith("c/") or "/c/" in key) and "p.zarr.partial" in str(self.root):
            writes.append(key)
            if len(writes) > 12:
                raise OSError(errno.ENOSPC, "No space left on device")
        return await real(self, key, value, *args, **kwargs)

    out = tmp_path / "p.zarr"
    args = ["predict", "--model", str(model_dir), "--input", str(src), "--block", "32", "--quiet"]
    monkeypatch.setattr(LocalStore, "set", filling)
    assert main([*args, "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"lsmfm predict: error: {out}: no space left on device", err
    assert "finished block(s) are kept" in err and "Traceback" not in err
    assert (tmp_path / "p.zarr.partial").is_dir() and not out.exists()
    monkeypatch.setattr(LocalStore, "set", real)
    assert main([*args, "--out", str(out), "--json", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert 0 < summary["blocks_resumed"] < summary["blocks"]
    assert main([*args, "--out", str(tmp_path / "whole.zarr")]) == 0
    for level in ("0", "1", "labels/mask/0"):
        np.testing.assert_array_equal(zarr.open_array(str(out / level))[:],
                                      zarr.open_array(str(tmp_path / "whole.zarr" / level))[:])
