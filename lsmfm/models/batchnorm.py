"""BatchNorm statistics re-estimated on the user's own images, before finetuning.

A pretrained backbone's running statistics describe its pretraining data, or nothing at all: the LSM
foundation model paper's EMA teachers kept their initial mean 0 / var 1 (`lsmfm.weights.paper`). Running
the network over unlabelled patches of the user's data in train mode, without gradients, with a
cumulative average (`momentum=None`), gives statistics of that data; nothing else changes. Only
BatchNorm layers are touched (instance norm has no statistics).

Example:
    >>> n = reestimate_batchnorm(backbone, windows)  # windows: (N, C, z, y, x) normalised patches
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

MAX_WINDOWS = 64


def batchnorm_layers(net: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def reestimate_batchnorm(net: nn.Module, windows: torch.Tensor, batch_size: int = 2) -> int:
    """Replace every BatchNorm layer's running mean/var by the average over `windows`; returns the
    number of windows used (0: the network has no BatchNorm, nothing changed). `net` ends in eval mode."""
    layers = batchnorm_layers(net)
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every window counts the same
    net.eval()
    for m in layers:
        m.train()
    device = next(net.parameters()).device
    try:
        for start in range(0, len(windows), batch_size):
            net(windows[start:start + batch_size].to(device))
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        net.eval()
    return len(windows)


def image_windows(images: Iterable[np.ndarray], size: tuple[int, int, int], seed: int = 0,
                  limit: int = MAX_WINDOWS) -> torch.Tensor:
    """(N, C, *size) windows of normalised (C, z, y, x) images: a non-overlapping grid per image (a
    smaller image is padded by reflection), at most `limit` drawn with `seed`."""
    tiles = []
    for image in images:
        pad = [(0, 0)] + [(0, max(s - n, 0)) for n, s in zip(image.shape[1:], size)]
        image = np.pad(image, pad, mode="reflect") if any(p for _, p in pad) else image
        grid = [range(0, n - s + 1, s) for n, s in zip(image.shape[1:], size)]
        tiles += [image[:, z:z + size[0], y:y + size[1], x:x + size[2]]
                  for z in grid[0] for y in grid[1] for x in grid[2]]
    if len(tiles) > limit:
        keep = np.random.default_rng(seed).choice(len(tiles), limit, replace=False)
        tiles = [tiles[i] for i in sorted(keep)]
    return torch.from_numpy(np.stack(tiles).astype(np.float32))
