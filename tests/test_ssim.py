"""3D SSIM: identity, agreement with scikit-image's Gaussian-window SSIM, and the loss's gradient."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from lsmfm.losses.ssim import SSIMLoss, gaussian_window, ssim
from lsmfm.metrics.restoration import ssim3d


def pair(shape=(20, 24, 22), noise=0.15, seed=0) -> tuple[np.ndarray, np.ndarray]:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    a = gaussian_filter(rng.random(shape), 1.0)
    b = np.clip(a + noise * rng.standard_normal(shape), 0.0, 1.0)
    return a, b


def test_gaussian_window_sums_to_one_and_has_sigma():
    w = gaussian_window(11, 1.5, torch.float64)
    x = torch.arange(11, dtype=torch.float64) - 5
    assert w.sum().item() == pytest.approx(1.0)
    assert torch.argmax(w).item() == 5
    assert w[4].item() / w[5].item() == pytest.approx(np.exp(-1 / (2 * 1.5 ** 2)))
    assert (w * x ** 2).sum().item() < 1.5 ** 2  # truncated at 5 voxels: slightly narrower than sigma²
    with pytest.raises(ValueError, match="odd"):
        gaussian_window(8)


def test_identical_volumes_score_one():
    a, _ = pair()
    assert ssim3d(a, a, data_range=1.0) == pytest.approx(1.0, abs=1e-12)
    x = torch.from_numpy(a).float()[None, None]
    assert SSIMLoss(data_range=1.0)(x, x).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("data_range,noise", [(1.0, 0.15), (1.0, 0.4), (4.0, 0.15)])
def test_matches_scikit_image(data_range, noise):
    a, b = pair(noise=noise)
    a, b = a * data_range, b * data_range
    ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                data_range=data_range)
    assert 0.0 < ref < 0.99
    assert ssim3d(a, b, data_range=data_range) == pytest.approx(ref, abs=1e-6)


def test_channels_are_scored_separately_and_averaged():
    a, b = pair(seed=1)
    c, d = pair(seed=2, noise=0.3)
    both = ssim3d(np.stack([a, c]), np.stack([b, d]), data_range=1.0)
    assert both == pytest.approx((ssim3d(a, b, 1.0) + ssim3d(c, d, 1.0)) / 2, abs=1e-9)


def test_loss_gradient_moves_prediction_towards_target():
    a, b = pair(shape=(16, 16, 16))
    target = torch.from_numpy(a).float()[None, None]
    pred = torch.from_numpy(b).float()[None, None].requires_grad_(True)
    loss_fn = SSIMLoss(data_range=1.0, window_size=7)
    loss = loss_fn(pred, target)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    with torch.no_grad():
        stepped = pred - 0.5 * pred.grad / pred.grad.abs().max()
    assert loss_fn(stepped, target).item() < loss.item()


def test_window_larger_than_volume_is_an_error():
    x = torch.zeros(1, 1, 8, 32, 32)
    with pytest.raises(ValueError, match="does not fit"):
        ssim(x, x, data_range=1.0)
