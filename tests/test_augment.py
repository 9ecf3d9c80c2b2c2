"""Patch augmentations: seeded reproducibility, what each transform does to values, config checks."""
from __future__ import annotations

import pytest
import torch

from lsmfm.config import load_config
from lsmfm.data.stream.augment import Augmenter
from lsmfm.data.stream.config import AugmentConfig
from lsmfm.errors import ConfigError

NONE = dict(flip_prob=0.0, rot90_prob=0.0, scale_prob=0.0, shift_prob=0.0, gamma_prob=0.0, noise_prob=0.0)


def _x() -> torch.Tensor:
    return torch.rand(1, 8, 12, 12, generator=torch.Generator().manual_seed(0))


def test_same_seed_same_output_other_seed_differs():
    aug = Augmenter(AugmentConfig())
    x = _x()
    assert torch.equal(aug(x, 5), aug(x, 5))
    outs = [aug(x, s) for s in range(6)]
    assert sum(not torch.equal(outs[0], o) for o in outs[1:]) >= 4
    assert x.equal(_x())  # the input is not modified in place


def test_flips_and_rotations_only_move_voxels():
    x = _x()
    flipped = Augmenter(AugmentConfig(**{**NONE, "flip_prob": 1.0}))(x, 0)
    assert torch.equal(flipped, torch.flip(x, dims=(1, 2, 3)))
    moved = Augmenter(AugmentConfig(**{**NONE, "flip_prob": 0.5, "rot90_prob": 1.0}))(x, 3)
    assert moved.shape == x.shape and not torch.equal(moved, x)
    assert torch.equal(moved.flatten().sort().values, x.flatten().sort().values)
    # rotations stay in the (y, x) plane: each z slice keeps its values (flips may reverse z)
    assert torch.allclose(moved.sum(dim=(2, 3)).sort(dim=1).values, x.sum(dim=(2, 3)).sort(dim=1).values)


def test_intensity_transforms():
    x = _x() + 0.1
    scaled = Augmenter(AugmentConfig(**{**NONE, "scale_prob": 1.0, "scale": 0.1}))(x, 1)
    ratio = scaled / x
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio)) and 0.9 <= ratio.flatten()[0] <= 1.1
    shifted = Augmenter(AugmentConfig(**{**NONE, "shift_prob": 1.0, "shift": 0.2}))(x, 1)
    offset = (shifted - x).flatten()
    assert torch.allclose(offset, offset[0].expand_as(offset), atol=1e-6) and abs(offset[0]) <= 0.2
    gamma = Augmenter(AugmentConfig(**{**NONE, "gamma_prob": 1.0, "gamma": [2.0, 2.0]}))(x, 1)
    lo, hi = x.min(), x.max()
    assert torch.allclose(gamma, ((x - lo) / (hi - lo)) ** 2 * (hi - lo) + lo, atol=1e-4)
    noisy = Augmenter(AugmentConfig(**{**NONE, "noise_prob": 1.0, "noise_std": 0.05}))(x, 1)
    assert 0.0 < (noisy - x).std() <= 0.06


def test_disabled_or_zero_probabilities_are_identity_and_meta_tracking_is_restored():
    from monai.data import get_track_meta

    x = _x()
    before = get_track_meta()
    assert torch.equal(Augmenter(AugmentConfig(**NONE))(x, 7), x)
    assert Augmenter(AugmentConfig(enabled=False))(x, 7) is x
    out = Augmenter(AugmentConfig())(x, 7)
    assert type(out) is torch.Tensor and out.dtype == torch.float32 and get_track_meta() == before


@pytest.mark.parametrize("override, fragment", [
    ("flip_prob=1.5", "augment.flip_prob must be in"),
    ("gamma=[2, 1]", "augment.gamma"),
    ("noise_std=-1", "augment.noise_std"),
])
def test_bad_augment_config(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(AugmentConfig, None, [override])
