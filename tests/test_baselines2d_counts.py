"""Exact trainable-parameter counts on the default ViT-B configurations (random weights; nothing is
downloaded)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from lsmfm.baselines2d.build import build_model, count_parameters, prepare
from lsmfm.baselines2d.config import ModelConfig, PeftConfig



@pytest.fixture(scope="module")
def sam_vit_b() -> torch.nn.Module:
    """transformers' default SamConfig (ViT-B), random weights; built once (about 94 M parameters)."""
    return build_model(ModelConfig(name="sam", size="vit_b"))


def trainable(base: torch.nn.Module, **peft) -> int:
    return count_parameters(prepare(copy.deepcopy(base), PeftConfig(**peft)))[0]


def test_sam_vit_b_is_the_published_architecture(sam_vit_b):
    # SAM ViT-B: 89.67 M image encoder + 4.06 M mask decoder (prompt encoder dropped)
    encoder = sum(p.numel() for p in sam_vit_b.encoder.parameters())
    decoder = sum(p.numel() for p in sam_vit_b.head.parameters())
    assert (encoder, decoder) == (89_670_912, 4_058_340)
    assert sam_vit_b.input_size == 1024 and len(sam_vit_b.layers) == 12


def test_ptsam_counts(sam_vit_b):
    assert trainable(sam_vit_b, method="ptsam") == 8 * 256 == 2_048
    assert trainable(sam_vit_b, method="ptsam", encoder_tokens=8) == 2_048 + 12 * 8 * 768 == 75_776


def test_lora_rank_32_adds_exactly_q_and_v_adapters(sam_vit_b):
    frozen = trainable(sam_vit_b, method="frozen")
    # the mask decoder without the parts that never reach the single-mask output (IoU head, 3 multimask MLPs)
    assert frozen == 4_058_340 - 132_612 - 3 * 139_808 == 3_506_304
    lora = trainable(sam_vit_b, method="lora", rank=32)
    assert lora - frozen == 12 * 2 * (768 * 32 + 32 * 768) == 1_179_648


def test_peft_library_lora_on_dinov2_vit_b_adds_the_same():
    # shapes only: the meta device builds the architecture without allocating weights
    with torch.device("meta"):
        base = build_model(ModelConfig(name="dinov2", size="vit_b"))
        frozen = trainable(base, method="frozen")
        lora = trainable(base, method="lora", rank=32)
    assert lora - frozen == 1_179_648


def test_efficell_decoder_has_a_few_million_parameters():
    with torch.device("meta"):
        model = prepare(
            build_model(ModelConfig(name="sam", size="vit_b", decoder="efficell")),
            PeftConfig(method="frozen"),
        )
    n = count_parameters(model)[0]
    assert n == 2_416_769 and n == sum(p.numel() for p in model.head.parameters())


def test_dry_run_prints_one_json_line(capsys):
    from lsmfm.cli.main import main

    assert (
        main(["baseline2d", "model.size=tiny", "peft.method=ptsam", "peft.encoder_tokens=8", "--dry-run"])
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["trainable_params"] == 8 * 64 + 4 * 8 * 64  # tiny SAM: 64-wide decoder and encoder, 4 layers
    assert out["total_params"] > out["trainable_params"]
