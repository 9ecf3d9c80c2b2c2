"""Two DeepSpeed processes on CPU (gloo, loopback): ZeRO-2 partitions the optimizer over both ranks and,
with one patch per rank, the CLIP loss is non-zero and trains its temperature (the paper's fault 1: without
gathering across ranks a one-pair batch has a CLIP loss of exactly 0)."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from pretrain_helpers import TINY, cli, synthetic_catalog, tiny_overrides

from lsmfm.training.distributed import free_port
from lsmfm.training.logging import read_jsonl


@pytest.mark.slow
def test_two_process_zero2_run_has_a_nonzero_clip_loss_with_one_patch_per_rank(tmp_path):
    catalog = synthetic_catalog(tmp_path / "stores")
    run = tmp_path / "run"
    port = str(free_port())
    overrides = tiny_overrides(catalog, 4, **{"train.batch_size": 1, "train.zero_stage": 2,
                                              "train.checkpoint_every": 4, "train.image_every": 0,
                                              "model.text.warmup_steps": 2})
    procs = [cli(["pretrain", "--config", str(TINY), "--out", str(run), *overrides],
                 env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r), "WORLD_SIZE": "2",
                      "LOCAL_RANK": str(r)})
             for r in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]

    losses = read_jsonl(run / "losses.jsonl")
    assert len(losses) == 4 and all(math.isfinite(r["loss"]) for r in losses)
    assert max(r["clip"] for r in losses) > 0.1  # a 1x1 local logit matrix would give exactly 0
    metrics = json.loads((run / "metrics.json").read_text())
    # the learnable temperature only gets a gradient through the CLIP loss
    assert metrics["monitors"]["clip_temperature"] != pytest.approx(0.07, abs=1e-7)
    assert metrics["teacher_updates"] == 4

    tag = run / "checkpoints" / "step_00000004"
    assert sorted(p.name for p in tag.glob("zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    states = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    assert states["samples"] == [4, 4] and len(states["rng"]) == 2


def test_a_one_rank_run_binds_no_port(monkeypatch):
    """Without a launcher the group uses an in-process store: runs started together cannot race for a
    port (gloo used to fail with EADDRINUSE when another run took the port free_port had released)."""
    import torch.distributed as dist

    from lsmfm.training import distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")  # recorded, so the variables init sets are undone after the test
        monkeypatch.delenv(key)
    env = distributed.init(torch.device("cpu"))
    try:
        t = torch.ones(3)
        dist.all_reduce(t)
        assert env.world_size == 1 and t.tolist() == [1.0, 1.0, 1.0]
        assert "MASTER_PORT" not in os.environ
    finally:
        distributed.shutdown()


def test_free_port_is_below_the_ephemeral_range():
    from lsmfm.training.distributed import PORT_FLOOR, _ephemeral_low

    ports = {free_port() for _ in range(20)}
    assert all(PORT_FLOOR <= p < _ephemeral_low() for p in ports) and len(ports) > 1
