"""The block plan of whole-volume prediction: cores aligned to output shards, regions that reproduce the
whole-volume sliding window exactly.

Each axis is split into the fewest balanced cores of at most `block` voxels whose boundaries are
multiples of `unit` (the output's shard edge), so every block writes whole shards and no two blocks, or
ranks, ever write the same file. A block reads the union of the whole-volume windows that touch its
core: MONAI's window grid along an axis of `size` voxels starts windows at `i * step` and clamps the
last one to `size - roi` (`monai.data.utils.dense_patch_slices`), and a region that starts at one of
those windows and ends at the end of another holds exactly that stretch of the grid, so MONAI places the
same windows inside the block. Every output voxel then blends the same window outputs with the same
Gaussian weights as one in-memory `sliding_window_inference` over the whole volume.

The plan depends only on the volume, the model's window and the options: never on the number of
ranks, so any split of the blocks over ranks writes the same store.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Block:
    """One unit of work: the `core` written to the output and the `region` read (core + context)."""

    core: tuple[slice, slice, slice]
    region: tuple[slice, slice, slice]

    @property
    def core_in_region(self) -> tuple[slice, slice, slice]:
        return tuple(slice(c.start - r.start, c.stop - r.start)  # type: ignore[return-value]
                     for c, r in zip(self.core, self.region))


def window_step(roi: int, overlap: float) -> int:
    """The sliding window's step along an axis, as MONAI computes it."""
    return max(int(roi * (1.0 - overlap)), 1)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Where MONAI starts its windows along an axis of `size` voxels (one window when it pads)."""
    if size <= roi:
        return [0]
    step = window_step(roi, overlap)
    return [min(i * step, size - roi) for i in range(math.ceil((size - roi) / step) + 1)]


def windows_along(size: int, roi: int, overlap: float) -> int:
    """Windows MONAI's sliding window places along an axis of `size` voxels."""
    return len(window_starts(size, roi, overlap))


def core_bounds(size: int, unit: int, block: int) -> list[int]:
    """Boundaries of the fewest balanced cores of at most max(block, unit) voxels along an axis, each
    boundary a multiple of `unit`; the last core ends at `size`."""
    units = math.ceil(size / unit)
    n = math.ceil(units / max(1, block // unit))
    return [unit * (units * k // n) for k in range(n)] + [size]


def axis_plan(size: int, roi: int, overlap: float, block: int, unit: int) -> list[tuple[int, int, int, int]]:
    """(core start, core stop, read start, read stop) of the blocks along one axis (see module doc)."""
    if size <= roi:
        return [(0, size, 0, size)]  # MONAI pads the whole axis: only one block reproduces that
    starts = window_starts(size, roi, overlap)
    bounds = core_bounds(size, unit, block)
    plan = []
    for c0, c1 in zip(bounds, bounds[1:]):
        touching = [s for s in starts if s < c1 and s + roi > c0]
        plan.append((c0, c1, touching[0], touching[-1] + roi))
    return plan


def plan_blocks(shape: tuple[int, int, int], roi: tuple[int, int, int], overlap: float, block: int,
                unit: int) -> list[Block]:
    """All blocks of a (Z, Y, X) volume, z-major."""
    axes = [axis_plan(s, r, overlap, block, unit) for s, r in zip(shape, roi)]
    return [Block(tuple(slice(a[0], a[1]) for a in combo),  # type: ignore[arg-type]
                  tuple(slice(a[2], a[3]) for a in combo))  # type: ignore[arg-type]
            for combo in ((z, y, x) for z in axes[0] for y in axes[1] for x in axes[2])]


def count_windows(blocks: list[Block], roi: tuple[int, int, int], overlap: float) -> int:
    """Network windows run over all blocks; windows touching two cores are run once per block, so this
    exceeds one whole-volume pass by about (1 + roi / core)³: the price of bounded memory."""
    return sum(math.prod(windows_along(r.stop - r.start, n, overlap) for r, n in zip(b.region, roi))
               for b in blocks)


def output_grid(block: int, chunk: int, shard: int) -> tuple[int, int]:
    """(inner chunk edge, shard edge) of a prediction store: chunks of at most `chunk` voxels and shards
    of at most `shard` chunks that fit in one block core, so blocks own whole shards."""
    chunk = min(chunk, block)
    return chunk, chunk * max(1, min(shard, block // chunk))
