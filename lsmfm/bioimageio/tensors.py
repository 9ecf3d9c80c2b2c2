"""The test tensors and cover image of a bioimage.io package, computed by lsmfm's own prediction path.

The test input has the model's patch size, so `lsmfm predict`'s sliding window is one window over it and
its output is the network's output on the whole input, which is what bioimage.io consumers compute:
the test output below is therefore both what `lsmfm predict` writes and what the package must reproduce.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lsmfm.errors import InputError


def make_test_input(config: Any, source: str | Path | None, seed: int = 0) -> np.ndarray:
    """A float32 (1, C, Z, Y, X) input of the model's patch size: the centre of the volume `source`, or
    when None a synthetic light-sheet volume (vessels and nuclei; one per channel)."""
    patch = tuple(int(p) for p in config.patch_size)
    channels = config.backbone.in_channels
    if source is None:
        from lsmfm.data.synthetic.volume import generate_volume, preset_config

        image = np.stack([generate_volume(preset_config("vessels", patch, seed + c)).image
                          for c in range(channels)])
    else:
        image = _centre_crop(source, patch, channels)
    return np.ascontiguousarray(image, dtype=np.float32)[None]


def _centre_crop(source: str | Path, patch: tuple[int, ...], channels: int) -> np.ndarray:
    from lsmfm.io.volumes import materialize, open_volume

    volume = open_volume(source)
    shape = volume.spatial_shape
    if any(s < p for s, p in zip(shape, patch)):
        raise InputError(source, f"is {'x'.join(map(str, shape))} voxels, smaller than the model's patch "
                                 f"size {'x'.join(map(str, patch))}; the test input is a patch-sized crop")
    if volume.czyx.shape[0] != channels:
        raise InputError(source, f"has {volume.czyx.shape[0]} channel(s) but the model expects {channels}")
    box = tuple(slice((s - p) // 2, (s - p) // 2 + p) for s, p in zip(shape, patch))
    image = materialize(volume.czyx[(slice(None), *box)], scheduler="synchronous").astype(np.float32)
    if not np.isfinite(image).all():
        raise InputError(source, "the centre crop holds NaN/Inf voxels; pass a volume without them")
    return image


def make_test_output(model: Any, config: Any, image: np.ndarray, threshold: float | None) -> np.ndarray:
    """What `lsmfm predict` writes for `image` (1, C, Z, Y, X), before its deblur output is mapped back to
    intensity units: the mask (uint8) at `threshold` for mask tasks, else the float32 output."""
    from lsmfm.data.normalize import normalize_channels
    from lsmfm.tasks.predict import PredictOptions, predict_block

    bounds = [tuple(float(v) for v in np.percentile(c, [config.normalize.lower, config.normalize.upper]))
              for c in image[0]]
    block = normalize_channels(image[0], config.normalize, bounds)  # type: ignore[arg-type]
    out = predict_block(model, block, tuple(int(p) for p in config.patch_size), PredictOptions())
    if model.spec.volume_output == "mask":
        assert threshold is not None
        return np.greater(out, threshold).astype(np.uint8)[None]
    return out.astype(np.float32)[None]


def write_cover(path: Path, image: np.ndarray, output: np.ndarray, title: str) -> Path:
    """A 2:1 PNG: the middle z plane of the test input beside the model's output on it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = image.shape[2] // 2
    fig, axes = plt.subplots(1, 2, figsize=(6, 3), dpi=100)
    for ax, data, name in zip(axes, (image[0, 0, z], output[0, 0, z]), ("input", title)):
        lo, hi = np.percentile(data, [0.5, 99.5])
        ax.imshow(data, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
        ax.set_title(f"{name} (z = {z})", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
