"""The text side of a paper image+text checkpoint (written by the paper's code path, tiny random BERT):
`encode_image` / `encode_text` equal the paper module's own embeddings, and `lsmfm analyze retrieval`
ranks prompts and catalog descriptions for volumes."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from paper_fixtures import PROMPTS, PaperPretrainModule, write_paper_pretraining_ckpt

from lsmfm.cli.main import main
from lsmfm.errors import InputError
from lsmfm.weights.paper_text import load_image_text


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_paper_pretraining_ckpt(tmp_path_factory.mktemp("text"), "unet", use_text=True)


def paper_module(path) -> PaperPretrainModule:
    """The paper's module rebuilt from its checkpoint, as its own scripts would (trusted load)."""
    obj = torch.load(path, map_location="cpu", weights_only=False)
    module = PaperPretrainModule(obj["hyper_parameters"], "unet")
    module.load_state_dict(obj["state_dict"])
    return module.eval()


def test_embeddings_equal_the_paper_modules(ckpt):
    model = load_image_text(ckpt)
    ref = paper_module(ckpt)
    x_xyz = torch.rand(3, 1, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_img = F.normalize(ref.image_proj(F.normalize(ref.student_encoder(x_xyz), dim=1)), dim=-1)
        want_txt = torch.cat([ref.encode_text([p]) for p in PROMPTS])
    got_img = model.encode_image(x_xyz.permute(0, 1, 4, 3, 2))
    got_txt = model.encode_text(PROMPTS)
    assert got_img.shape == (3, 8) and got_txt.shape == (2, 8)
    assert torch.allclose(got_img, want_img, atol=1e-6) and torch.allclose(got_txt, want_txt, atol=1e-6)
    assert torch.allclose(model.scale(), ref.logit_scale.exp())
    logits = model.logits(x_xyz.permute(0, 1, 4, 3, 2), PROMPTS)
    assert torch.allclose(logits, model.scale() * want_img @ want_txt.T, atol=1e-5)


def test_image_only_checkpoints_have_no_text_side(tmp_path):
    path = write_paper_pretraining_ckpt(tmp_path, "unet", use_text=False)
    with pytest.raises(InputError, match="image-only checkpoint"):
        load_image_text(path)


def test_retrieval_command_ranks_prompts_and_catalog_classes(ckpt, tmp_path, capsys):
    from lsmfm.data.catalog.entries import write_catalog

    images = sorted(str(p) for p in (ckpt.parent / "patches").rglob("*.nii.gz"))
    catalog = write_catalog(tmp_path / "catalog.yaml", [
        {"id": "nuclei", "store": str(tmp_path / "a.zarr"), "descriptions": [PROMPTS[0], "round nuclei"]},
        {"id": "vessels", "store": str(tmp_path / "b.zarr"), "descriptions": [PROMPTS[1]]}])
    out = tmp_path / "retrieval.json"
    args = ["analyze", "retrieval", "--model", str(ckpt), "--images", *images, "--catalog", str(catalog),
            "--prompt", "background", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["classes"]) == {"nuclei", "vessels", "background"}
    for ranked in report["images"].values():
        assert sum(r["probability"] for r in ranked) == pytest.approx(1.0)
        assert [r["probability"] for r in ranked] == sorted((r["probability"] for r in ranked), reverse=True)
    assert [r["image"] for r in report["classes"]["nuclei"]] != [] and len(report["classes"]["nuclei"]) == 4
    printed = capsys.readouterr().out
    assert all(image in printed for image in images)
    assert main(["analyze", "retrieval", "--model", str(ckpt), "--images", images[0], "--prompt", "x"]) == 1
    assert "at least two classes" in capsys.readouterr().err
