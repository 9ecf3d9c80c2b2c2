"""Patch augmentations: seeded reproducibility, what each transform does to values, config checks."""
from __future__ import annotations

import numpy as np
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


def test_paper_transforms_affine_smoothing_joint_flip_and_clip():
    """The paper's extra transforms (all_datasets_transforms.get_train_transforms) against MONAI's own."""
    from monai.transforms import RandAffine, RandGaussianSmooth

    x = _x()
    joint = Augmenter(AugmentConfig(**{**NONE, "flip_prob": 1.0, "flip_axes": "all"}))(x, 0)
    assert torch.equal(joint, torch.flip(x, dims=(1, 2, 3)))
    kept = [Augmenter(AugmentConfig(**{**NONE, "flip_prob": 0.5, "flip_axes": "all"}))(x, s) for s in range(8)]
    assert all(torch.equal(k, x) or torch.equal(k, joint) for k in kept)  # all three axes or none
    affine = Augmenter(AugmentConfig(**{**NONE, "affine_prob": 1.0}))(x, 2)
    ref = RandAffine(prob=1.0, rotate_range=(0.1,) * 3, scale_range=(0.1,) * 3, padding_mode="reflection")
    compose_seeds = np.random.RandomState(2).randint(2**32, size=5, dtype="uint32")  # as MONAI's Compose
    ref.set_random_state(seed=int(compose_seeds[4]))  # draws them: affine is the 5th after 3 flips, rot90
    assert affine.shape == x.shape and not torch.equal(affine, x)
    assert torch.allclose(affine, torch.as_tensor(ref(x)), atol=1e-6)
    smooth = Augmenter(AugmentConfig(**{**NONE, "smooth_prob": 1.0, "smooth_sigma": [1.0, 1.0]}))(x, 3)
    direct = RandGaussianSmooth(sigma_x=(1.0, 1.0), sigma_y=(1.0, 1.0), sigma_z=(1.0, 1.0), prob=1.0)(x)
    assert torch.allclose(smooth, torch.as_tensor(direct), atol=1e-6) and smooth.std() < 0.5 * x.std()
    loud = AugmentConfig(**{**NONE, "shift_prob": 1.0, "shift": 0.9, "noise_prob": 1.0, "noise_std": 0.5})
    assert Augmenter(loud)(x, 4).max() > 1.0
    clipped = Augmenter(AugmentConfig(**{**loud.__dict__, "clip": True}))(x, 4)
    assert clipped.min() >= 0.0 and clipped.max() <= 1.0


def test_default_transform_list_is_unchanged_by_the_new_options():
    """Options off by default add no MONAI transform, so every seed of the default list stays as it was."""
    names = [type(t).__name__ for t in Augmenter(AugmentConfig()).transform.transforms]
    assert names == ["RandFlip"] * 3 + ["RandRotate90", "RandScaleIntensity", "RandShiftIntensity",
                                         "RandAdjustContrast"]
    assert Augmenter(AugmentConfig()).smooth is None


@pytest.mark.parametrize("override, fragment", [
    ("flip_prob=1.5", "augment.flip_prob must be in"),
    ("gamma=[2, 1]", "augment.gamma"),
    ("noise_std=-1", "augment.noise_std"),
    ("affine_scale=1.5", "augment.affine_scale"),
    ("smooth_sigma=[2, 1]", "augment.smooth_sigma"),
    ("flip_axes=some", "flip_axes must be one of"),
])
def test_bad_augment_config(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(AugmentConfig, None, [override])
