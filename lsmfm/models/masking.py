"""Block masks with mixed block sizes, generated for the whole batch at once on the device.

How `generate_block_mask` works (no Python loop over blocks):
1. Work on the grid of the smallest block size s0 (every block size must be a multiple of s0 and divide
   the largest size L, e.g. 8 and 16): each s0-cell has the same volume, so ratios are counted in cells.
2. For every block size s draw one random score per s-aligned block and upsample it to the s0-grid
   (nearest, by expanding): all cells of one block share a score.
3. Every L-aligned region picks one block size at random; each cell takes the score of that size.
   This mixes sizes within a patch and keeps every block aligned to its own size.
4. Per sample, the cells whose score lies above the (1 - ratio) quantile (`kthvalue`) are masked, so
   whole blocks are masked and the achieved ratio is within one block of the target.
5. The cell mask is upsampled to voxels.

`generate_sample_block_mask` is the paper's scheme (`size_choice: sample`), batched: one block size per
sample (uniform over `block_sizes`, a coin flip for [8, 16]) and exactly floor(ratio * N) of the N blocks of
that size's aligned grid (at least one), a uniform random subset as `randperm(N)[:k]` draws it.
`block_mask` picks between the two by `MaskConfig.size_choice`.

The paper's per-sample Python loop, the baseline of the speed-up, lives with the benchmark
(`benchmarks/paper_step.py`).

Example:
    >>> m = generate_block_mask(2, (32, 32, 32), [8, 16], 0.5, generator=0)
    >>> m.shape, m.dtype
    (torch.Size([2, 32, 32, 32]), torch.bool)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch


@dataclass
class MaskConfig:
    """Masking of the student's input.

    Args:
        block_sizes: cubic block edge lengths in voxels; each a multiple of the smallest and a divisor
            of the largest (patch sizes must be multiples of the largest).
        size_choice: "region": a block size per largest-block region, so sizes mix within a patch;
            "sample": one size per sample (the paper's), floor(ratio * N) blocks of its aligned grid.
        ratio: fraction of voxels masked after the warm-up.
        ratio_start: fraction masked at step 0, going to `ratio` over `warmup_steps`.
        ratio_schedule: "linear": a linear ramp from ratio_start to ratio; "step": ratio_start for the
            first `warmup_steps` steps, then ratio (the paper's warm-up epochs).
        warmup_steps: length of that warm-up (0: `ratio` from the start).
        fill: "token" replaces masked voxels by a learnable per-channel mask token; "constant" by
            `fill_value` (0.0 is the bottom of the percentile-normalised intensity range).
        fill_value: the constant used when fill is "constant" (and the mask token's initial value).
    """

    block_sizes: list[int] = field(default_factory=lambda: [8, 16])
    size_choice: Literal["region", "sample"] = "region"
    ratio: float = 0.6
    ratio_start: float = 0.3
    ratio_schedule: Literal["linear", "step"] = "linear"
    warmup_steps: int = 0
    fill: Literal["token", "constant"] = "token"
    fill_value: float = 0.0

    def __post_init__(self) -> None:
        check_block_sizes(self.block_sizes)
        for name in ("ratio", "ratio_start"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")


def check_block_sizes(block_sizes: Sequence[int]) -> None:
    """Raise ValueError unless the sizes nest (each divides the largest, the smallest divides each)."""
    if not block_sizes or min(block_sizes) < 1:
        raise ValueError(f"block_sizes must be positive integers, got {list(block_sizes)}")
    small, large = min(block_sizes), max(block_sizes)
    if any(large % s or s % small for s in block_sizes):
        raise ValueError(f"block_sizes must nest (each a multiple of the smallest and a divisor of the "
                         f"largest), got {list(block_sizes)}")


def _generator(generator: torch.Generator | int | None, device: torch.device) -> torch.Generator | None:
    if isinstance(generator, int):
        gen = torch.Generator(device=device)
        gen.manual_seed(generator)
        return gen
    return generator


def _upsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Nearest upsampling of the last three dims by an integer factor.

    Expands one dim at a time, innermost first, so each copy moves contiguous rows (several times faster
    than `repeat_interleave` on boolean masks).
    """
    *b, d, h, w = x.shape
    x = x.unsqueeze(-1).expand(*b, d, h, w, factor).reshape(*b, d, h, w * factor)
    x = x.unsqueeze(-2).expand(*b, d, h, factor, w * factor).reshape(*b, d, h * factor * w * factor)
    x = x.unsqueeze(-2).expand(*b, d, factor, h * factor * w * factor)
    return x.reshape(*b, d * factor, h * factor, w * factor)


def generate_block_mask(batch: int, spatial_shape: Sequence[int], block_sizes: Sequence[int], ratio: float,
                        generator: torch.Generator | int | None = None,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask (batch, D, H, W), True = masked, with blocks of mixed sizes (see the module doc).

    Args:
        batch: number of samples; each gets its own mask.
        spatial_shape: (D, H, W), each a multiple of max(block_sizes).
        block_sizes: nested cubic block sizes in voxels, e.g. [8, 16].
        ratio: target masked fraction in [0, 1]; achieved within one largest block per sample.
        generator: a torch.Generator on `device`, an int seed, or None for the global RNG.
        device: where the mask is built (default CPU).
    """
    check_block_sizes(block_sizes)
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(int(s) for s in spatial_shape)
    small, large = min(block_sizes), max(block_sizes)
    if len(shape) != 3 or any(s % large for s in shape):
        raise ValueError(f"spatial shape {shape} must be 3D and divisible by the largest block size {large}")
    gen = _generator(generator, device)
    sizes = sorted(set(int(s) for s in block_sizes))
    cells = tuple(s // small for s in shape)
    def grid(s: int) -> tuple[int, ...]:
        return (batch, *(c * small // s for c in cells))

    scores = torch.stack([_upsample(torch.rand(grid(s), generator=gen, device=device), s // small)
                          for s in sizes])
    level = torch.randint(len(sizes), grid(large), generator=gen, device=device)
    level = _upsample(level, large // small)
    score = torch.gather(scores, 0, level.unsqueeze(0))[0].reshape(batch, -1)
    n_cells = score.shape[1]
    n_masked = int(round(min(max(ratio, 0.0), 1.0) * n_cells))
    if n_masked == 0:
        cell_mask = torch.zeros_like(score, dtype=torch.bool)
    elif n_masked == n_cells:
        cell_mask = torch.ones_like(score, dtype=torch.bool)
    else:
        threshold = torch.kthvalue(score, n_cells - n_masked, dim=1, keepdim=True).values
        cell_mask = score > threshold
    return _upsample(cell_mask.reshape(batch, *cells), small)


def generate_sample_block_mask(batch: int, spatial_shape: Sequence[int], block_sizes: Sequence[int],
                               ratio: float, generator: torch.Generator | int | None = None,
                               device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean mask (batch, D, H, W), True = masked: one block size per sample, the paper's masking.

    Each sample draws its size uniformly from `block_sizes`, then max(1, floor(ratio * N)) distinct
    blocks of the N blocks on that size's aligned grid, uniformly (the top-k of random scores is a
    uniform random subset, as `randperm(N)[:k]`). Arguments as for `generate_block_mask`.
    """
    check_block_sizes(block_sizes)
    device = torch.device(device) if device is not None else torch.device("cpu")
    shape = tuple(int(s) for s in spatial_shape)
    if len(shape) != 3 or any(s % max(block_sizes) for s in shape):
        raise ValueError(f"spatial shape {shape} must be 3D and divisible by the largest block size "
                         f"{max(block_sizes)}")
    gen = _generator(generator, device)
    sizes = sorted(set(int(s) for s in block_sizes))
    choice = torch.randint(len(sizes), (batch,), generator=gen, device=device)
    mask = torch.zeros((batch, *shape), dtype=torch.bool, device=device)
    for i, size in enumerate(sizes):
        rows = (choice == i).nonzero().flatten()
        if len(rows) == 0:
            continue
        grid = tuple(n // size for n in shape)
        n_blocks = grid[0] * grid[1] * grid[2]
        k = min(n_blocks, max(1, int(ratio * n_blocks)))
        picked = torch.rand((len(rows), n_blocks), generator=gen, device=device).topk(k, dim=1).indices
        cells = torch.zeros((len(rows), n_blocks), dtype=torch.bool, device=device).scatter_(1, picked, True)
        mask[rows] = _upsample(cells.reshape(len(rows), *grid), size)
    return mask


def block_mask(cfg: MaskConfig, batch: int, spatial_shape: Sequence[int], ratio: float,
               generator: torch.Generator | int | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
    """The batch's mask by `cfg.size_choice`: mixed sizes per region, or one size per sample."""
    make = generate_sample_block_mask if cfg.size_choice == "sample" else generate_block_mask
    return make(batch, spatial_shape, cfg.block_sizes, ratio, generator=generator, device=device)


def apply_mask(images: torch.Tensor, mask: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
    """Replace masked voxels by `fill`: a per-channel (C,) tensor (the learnable mask token) or a constant.

    Args:
        images: (B, C, D, H, W).
        mask: (B, D, H, W) bool, True = masked.
        fill: (C,) tensor (gradients flow into it) or a float.
    """
    if mask.shape != images.shape[:1] + images.shape[2:]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match images {tuple(images.shape)}")
    if isinstance(fill, torch.Tensor):
        value = fill.to(images.dtype).view(1, -1, 1, 1, 1)
    else:
        value = torch.full((), float(fill), dtype=images.dtype, device=images.device)
    return torch.where(mask.unsqueeze(1), value, images)
