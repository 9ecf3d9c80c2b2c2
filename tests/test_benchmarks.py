"""The benchmark scripts run as documented, on tiny inputs (their numbers are not asserted: timing
belongs to the benchmarks, not to unit tests; their correctness checks are)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_predict_benchmark_compares_blockwise_with_in_memory(tmp_path):
    out = tmp_path / "predict.json"
    cmd = [sys.executable, str(REPO / "benchmarks/predict.py"), "--sizes", "80", "--blocks", "64",
           "--ranks", "1", "2", "--threads", "1", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "in-memory sliding window" in done.stdout and "lsmfm predict, block 64, 2 ranks" in done.stdout
    one, two, in_memory = json.loads(out.read_text())["rows"]
    assert one["blocks"] == 8 and one["windows"] > one["windows_one_pass"] == 8
    assert two["ranks"] == 2 and sorted(two["blocks_run_per_rank"]) == [4, 4] and one["all_outputs_identical"]
    assert in_memory["windows"] == 8 and in_memory["max_abs_diff_vs_blockwise"] < 1e-5
    for row in (one, two, in_memory):
        assert row["size"] == 80 and row["rss_peak_mib"] > row["rss_baseline_mib"] > 0
    assert two["scaling_efficiency"] > 0 and one["files_per_tib_float32"] > 0


def test_ingest_benchmark_compares_layouts_and_schedulers(tmp_path):
    out = tmp_path / "ingest.json"
    cmd = [sys.executable, str(REPO / "benchmarks/ingest.py"), "--sizes", "128", "--shards", "2", "1",
           "--workers", "1", "2", "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "LocalCluster, 1 workers" in done.stdout and "LocalCluster, 2 workers" in done.stdout
    sharded, plain, one, two = json.loads(out.read_text())["rows"]
    assert plain["files"] > sharded["files"] == one["files"] == two["files"]
    assert one["same_store_as_threads"] and two["same_store_as_threads"]
    assert [len(r["worker_rss_peak_mib"]) for r in (one, two)] == [1, 2]
    assert one["scaling_efficiency"] == 1.0 and two["scaling_efficiency"] > 0
    for row in (sharded, plain, one, two):  # the layout's count, used for a whole 1 TiB volume, is exact
        assert row["files_by_layout"] == row["files"]
    assert plain["files_1tib_volume"] > 7 * sharded["files_1tib_volume"]  # 2³ chunks per shard here


# ---- the paper's step and masking (benchmarks/paper_step.py), the baseline of pretrain_step.py ------------
def paper_module():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import paper_step

    return paper_step


def test_paper_mask_is_one_aligned_block_size_per_sample_and_floor_ratio_blocks():
    import torch

    ps = paper_module()
    torch.manual_seed(1)
    mask = ps.paper_patch_mask(torch.zeros(6, 1, 64, 64, 64), 8, 0.3)
    assert mask.shape == (6, 1, 64, 64, 64) and mask.dtype == torch.bool
    sizes = set()
    for m in mask[:, 0]:
        for size in (8, 16):
            blocks = m.reshape(64 // size, size, 64 // size, size, 64 // size, size).permute(0, 2, 4, 1, 3, 5)
            blocks = blocks.reshape(-1, size ** 3)
            whole = blocks.all(dim=1) | ~blocks.any(dim=1)  # every block of the grid fully in or out
            n_total = (64 // size) ** 3
            if whole.all() and int(blocks.all(dim=1).sum()) == max(1, int(0.3 * n_total)):
                sizes.add(size)
                break
        else:
            raise AssertionError("a sample's mask is not floor(0.3 N) aligned blocks of one size")
    assert sizes == {8, 16}  # the coin flip picked both sizes over six samples


def test_paper_ibot_loss_hand_values():
    """KL is 0 when student and teacher features agree; L1 is over masked voxels of the decoder output."""
    import torch

    ps = paper_module()
    step = ps.PaperStep(torch.nn.Identity(), torch.nn.Identity(), 4, ps.PaperSettings())
    feats = torch.nn.functional.normalize(torch.rand(1, 4, 4, 4, 4), dim=1)
    x = torch.rand(1, 1, 4, 4, 4)
    mask = torch.zeros(1, 1, 4, 4, 4, dtype=torch.bool)
    mask[..., :2, :, :] = True
    with torch.no_grad():
        for conv in step.reconstruction_head.decoder[::2]:
            conv.weight.zero_()
            conv.bias.zero_()
    total, composite = step._ibot_loss(feats, feats, x, mask, feats, None, None)
    l1 = x[..., :2, :, :].abs().mean()  # the decoder outputs 0
    assert total.item() == pytest.approx(0.20 * l1.item(), rel=1e-5)
    assert torch.equal(composite[..., 2:, :, :], x[..., 2:, :, :])


def test_paper_step_trains_student_and_decoder_and_moves_teacher():
    import torch

    ps = paper_module()
    student = torch.nn.Conv3d(1, 8, 3, padding=1)
    module = ps.build_paper_step(student, 8, "unet")
    teacher_before = module.teacher_encoder.weight.detach().clone()
    assert torch.equal(teacher_before, student.weight)
    opt = module.optimizer()
    loss = module.loss(torch.rand(2, 1, 32, 32, 32))
    loss.backward()
    assert student.weight.grad is not None and module.reconstruction_head.decoder[0].weight.grad is not None
    assert module.teacher_encoder.weight.grad is None
    opt.step()
    module.update_teacher()
    m = module.settings.ema_decay
    assert torch.allclose(module.teacher_encoder.weight, m * teacher_before + (1 - m) * student.weight)


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu_writes_every_part(tmp_path):
    """benchmarks/gpu.sh is meant for a GPU machine; --dry runs the same script on CPU at tiny sizes."""
    out = tmp_path / "gpu"
    env = {**os.environ, "PY": sys.executable}
    done = subprocess.run(["bash", str(REPO / "benchmarks/gpu.sh"), "--dry", str(out)], capture_output=True,
                          text=True, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((out / "gpu.json").read_text())
    assert r["dry_run"] and r["device"] == "cpu" and r["size"] == 32
    assert [(s["arch"], s["batch"]) for s in r["steps"]] == [("unet", 2)]
    assert all(s["seconds_per_step"] > 0 and s["tflops_per_s"] > 0 and s["mfu"] is None for s in r["steps"])
    assert set(r["step_ratio_vs_paper"]) == set(r["ssl_step_over_bare"]) == {"unet"}
    assert r["stream_loader"] == "lsmfm_loader_2workers_patches_per_s"
    assert r["stream_loader_patches_per_s"] > 0
    assert len(r["predict_voxels_per_s"]) == 1 and r["predict_voxels_per_s"][0] > 0
    assert "stream (lsmfm_loader_2workers_patches_per_s)" in done.stdout
    check_step_json_and_readme(out / "step_batch2.json", tmp_path)


def check_step_json_and_readme(step_json: Path, tmp_path: Path) -> None:
    """benchmarks/pretrain_step.py's JSON has the three ratios; --readme rewrites only its marked block."""
    r = json.loads(step_json.read_text())
    assert r["mask_speedup_vs_paper"] > 0 and r["mask"]["lsmfm_settings"]["ratio"] == 0.6
    assert r["mask"]["paper_settings"]["size_choice"] == "sample"
    unet = r["unet"]
    for variant in ("bare", "paper", "lsmfm"):
        assert unet[variant]["cpu_seconds_per_step"] > 0 and unet[variant]["flops_per_step"] > 0
    assert unet["paper"]["flops_per_step"] > unet["bare"]["flops_per_step"]  # teacher + decoder on top
    assert r["step_ratio_vs_paper"]["unet"] == unet["lsmfm"]["basis_s"] / unet["paper"]["basis_s"]
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- pretrain_step:begin -->\nold\n<!-- pretrain_step:end -->\nafter\n")
    subprocess.run([sys.executable, str(REPO / "benchmarks/pretrain_step.py"), "--from-json", str(step_json),
                    "--readme", str(readme)], capture_output=True, text=True, check=True)
    text = readme.read_text()
    assert text.startswith("before\n<!-- pretrain_step:begin -->")
    assert text.endswith("<!-- pretrain_step:end -->\nafter\n")
    assert "old" not in text and f"| {r['step_ratio_vs_paper']['unet']:.2f} |" in text
    again = tmp_path / "README2.md"
    again.write_text(readme.read_text())
    subprocess.run([sys.executable, str(REPO / "benchmarks/pretrain_step.py"), "--from-json", str(step_json),
                    "--readme", str(again)], capture_output=True, text=True, check=True)
    assert again.read_text() == text


def test_readme_step_tables_are_the_committed_json(tmp_path):
    """The README's pretraining-step tables are what `--readme` writes from the committed JSON, so the
    docs cannot drift from the measurement."""
    results = REPO / "benchmarks/results/pretrain_step_cpu.json"
    readme = tmp_path / "README.md"
    readme.write_text((REPO / "README.md").read_text())
    subprocess.run([sys.executable, str(REPO / "benchmarks/pretrain_step.py"), "--from-json", str(results),
                    "--readme", str(readme)], capture_output=True, text=True, check=True)
    assert readme.read_text() == (REPO / "README.md").read_text()
    r = json.loads(results.read_text())
    assert {"mask_speedup_vs_paper", "step_ratio_vs_paper", "ssl_step_over_bare"} <= set(r)
    assert all("lsmfm_before" in r[arch] for arch in r["step_ratio_vs_paper"])  # the before/after table


def _results(folder: Path, column: str, rows: list[tuple]) -> Path:
    folder.mkdir()
    lines = [f"shots,seed,{column},dice,cldice,iou"] + [",".join(map(str, r)) for r in rows]
    (folder / "results.csv").write_text("\n".join(lines) + "\n")
    return folder


def test_paired_table_pairs_arms_by_shots_and_seed(tmp_path):
    """Two finetune runs (init column) and a comparison (arm column): hand-computed paired differences."""
    pre = _results(tmp_path / "pre", "init", [(1, 0, "pretrained", 0.5, 0.5, 0.5),
                                              (1, 1, "pretrained", 0.2, 0.2, 0.2)])
    scr = _results(tmp_path / "scr", "init", [(1, 0, "scratch", 0.3, 0.3, 0.3),
                                              (1, 1, "scratch", 0.4, 0.4, 0.4),
                                              (2, 0, "scratch", 0.9, 0.9, 0.9)])
    out = tmp_path / "paired.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/paired.py"), str(pre), str(scr),
                           "--json", str(out)], capture_output=True, text=True, check=True)
    rows = json.loads(out.read_text())
    assert [(r["shots"], r["metric"], r["arm"]) for r in rows] == [(1, m, "pretrained")
                                                                    for m in ("dice", "cldice", "iou")]
    dice = rows[0]
    assert dice["arm_score"]["mean"] == pytest.approx(0.35)
    assert dice["arm_score"]["std"] == pytest.approx(0.15)
    assert dice["difference"]["mean"] == pytest.approx(0.0)
    assert dice["difference"]["std"] == pytest.approx(0.2)
    assert (dice["better"], dice["seeds"]) == (1, 2)
    row = "| 1 | dice | pretrained | 0.350 ± 0.150 | 0.350 ± 0.050 | +0.000 ± 0.200 | 1/2 |"
    assert row in done.stdout
    arms = _results(tmp_path / "cmp", "arm", [(1, 0, "scratch", 0.3, 0.3, 0.3),
                                              (1, 0, "sam", 0.1, 0.1, 0.1)])
    done = subprocess.run([sys.executable, str(REPO / "benchmarks/paired.py"), str(arms)],
                          capture_output=True, text=True, check=True)
    assert "| 1 | dice | sam | 0.100 ± 0.000 | 0.300 ± 0.000 | −0.200 ± 0.000 | 0/1 |" in done.stdout
