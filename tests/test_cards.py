"""Model cards (Hub and local): licence, paper and repository links, base_model of finetuned models,
training data, the few-shot results table, intended use and limits, provenance; LICENSE and
CITATION.cff agree with what the cards say."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from finetune_helpers import data_overrides, write_dataset

from lsmfm import __version__
from lsmfm.cli.main import main
from lsmfm.citation import PAPER_CODE_URL, PAPER_DOI, PAPER_URL
from lsmfm.models.backbones.unet import UNetConfig

REPO = Path(__file__).resolve().parents[1]


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A pretrained tiny backbone and a few-shot segmentation run from it and from scratch."""
    root = tmp_path_factory.mktemp("cards")
    torch.manual_seed(0)
    UNetConfig(channels=[8, 16, 32], strides=[2, 2], out_channels=8).build().save_pretrained(
        root / "weights", patch_size=[32, 32, 32],
        pretraining={"mode": "image_only", "which": "teacher", "data": ["demo.yaml: synth_00, synth_01"]})
    dirs = write_dataset(root / "patches", n_train=1, n_eval=1, size=32)
    argv = ["finetune", "segment", "--out", str(root / "run"), "--quiet", f"pretrained={root / 'weights'}",
            "shots=[1]", "seeds=[0,1]", "train.max_steps=2", "train.val_every=1", "train.batch_size=1",
            *data_overrides(dirs)]
    assert main(argv) == 0
    return root


def test_pretrained_backbone_card(run):
    card = (run / "weights" / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "mit" and meta["library_name"] == "lsmfm" and "base_model" not in meta
    assert "demo.yaml: synth_00, synth_01" in card  # training data: catalog ids
    assert "## Intended use and limits" in card and "Not for clinical use" in card
    assert PAPER_URL in card and PAPER_CODE_URL in card and f"Written by lsmfm {__version__}" in card


def test_finetuned_model_card(run):
    kept = sorted((run / "run" / "pretrained").glob("shots1_seed*/model"))
    assert len(kept) == 1  # keep=best
    card = (kept[0] / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == str(run / "weights") and "finetuned-segment" in meta["tags"]
    assert "## Training data" in card and "Few-shot run: 1 training patch(es)" in card
    assert "## Results" in card and "dice" in card
    table = card.split("The few-shot protocol it comes from", 1)[1]
    assert "pretrained" in table and "scratch" in table  # the whole protocol, filled in at its end
    assert "Mask threshold on the foreground probability: 0.5" in card
    assert "## Intended use and limits" in card and "lsmfm predict" in card
    scratch = (next((run / "run" / "scratch").glob("shots1_seed*/model")) / "README.md").read_text()
    assert "base_model" not in front_matter(scratch)


def test_licence_and_citation_file_agree_with_the_cards():
    assert (REPO / "LICENSE").read_text().startswith("MIT License")
    cff = yaml.safe_load((REPO / "CITATION.cff").read_text())
    assert cff["version"] == __version__ and cff["license"] == "MIT"
    paper = cff["references"][0]
    assert paper["doi"] == PAPER_DOI and paper["url"] == PAPER_URL
    assert paper["repository-code"] == PAPER_CODE_URL
    from lsmfm.citation import project_url

    assert cff["repository-code"] == project_url("Repository")
