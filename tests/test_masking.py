"""Block masking: achieved ratio, alignment of blocks to their sizes, mixing of sizes, the paper's
one-size-per-sample scheme, fill."""
from __future__ import annotations

import pytest
import torch

from lsmfm.models.masking import (MaskConfig, apply_mask, block_mask, generate_block_mask,
                                  generate_sample_block_mask)


def cubes(mask: torch.Tensor, size: int) -> torch.Tensor:
    """(B, D, H, W) -> (B, n_cubes, size**3): the voxels of each size-aligned cube."""
    b, d, h, w = mask.shape
    m = mask.reshape(b, d // size, size, h // size, size, w // size, size)
    return m.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, -1, size ** 3)


@pytest.mark.parametrize("ratio", [0.3, 0.6, 0.75])
def test_ratio_close_to_target_per_sample(ratio):
    mask = generate_block_mask(4, (64, 64, 64), [8, 16], ratio, generator=1)
    achieved = mask.float().mean(dim=(1, 2, 3))
    # within one largest block (16^3 of 64^3 = 1/64) of the target, for every sample
    assert torch.all((achieved - ratio).abs() <= 1 / 64), achieved


def test_blocks_aligned_to_smallest_size_and_sizes_mixed():
    mask = generate_block_mask(2, (64, 64, 64), [8, 16], 0.5, generator=2)
    small = cubes(mask, 8)
    assert torch.all(small.all(-1) | ~small.any(-1)), "an aligned 8^3 cube is partly masked"
    big = cubes(mask, 16).float().mean(-1)
    partial = ((big > 0) & (big < 1)).sum()
    assert partial > 0, "no 16^3 region holds 8^3 blocks: sizes are not mixed"
    assert (big == 1).sum() > 0 and (big == 0).sum() > 0


def test_single_size_gives_whole_blocks_of_that_size():
    mask = generate_block_mask(3, (32, 64, 32), [16], 0.5, generator=3)
    c = cubes(mask, 16)
    assert torch.all(c.all(-1) | ~c.any(-1))
    assert mask.shape == (3, 32, 64, 32) and mask.dtype == torch.bool


def test_seeded_and_samples_differ():
    a = generate_block_mask(2, (32, 32, 32), [8, 16], 0.5, generator=7)
    b = generate_block_mask(2, (32, 32, 32), [8, 16], 0.5, generator=7)
    assert torch.equal(a, b)
    assert not torch.equal(a[0], a[1])


def test_extreme_ratios():
    assert not generate_block_mask(1, (32, 32, 32), [8], 0.0).any()
    assert generate_block_mask(1, (32, 32, 32), [8], 1.0).all()


def test_invalid_sizes_and_shapes_raise():
    with pytest.raises(ValueError, match="nest"):
        MaskConfig(block_sizes=[8, 12])
    with pytest.raises(ValueError, match="divisible"):
        generate_block_mask(1, (40, 32, 32), [8, 16], 0.5)
    with pytest.raises(ValueError, match="ratio"):
        MaskConfig(ratio=1.2)


def test_apply_mask_token_gets_gradient_and_constant_fill():
    images = torch.rand(2, 1, 16, 16, 16)
    mask = generate_block_mask(2, (16, 16, 16), [8], 0.5, generator=0)
    token = torch.nn.Parameter(torch.tensor([0.25]))
    out = apply_mask(images, mask, token)
    assert torch.all(out[:, 0][mask] == 0.25) and torch.equal(out[:, 0][~mask], images[:, 0][~mask])
    out.sum().backward()
    assert token.grad.item() == pytest.approx(float(mask.sum()))
    const = apply_mask(images, mask, -1.0)
    assert torch.all(const[:, 0][mask] == -1.0)


def paper_patch_mask(batch: int, size: int, base: int, ratio: float, gen: torch.Generator) -> torch.Tensor:
    """The paper's `generate_patch_mask` (pretrain_module_unet.py), transcribed: a coin flip between the
    base block size and twice it per sample, then randperm over that size's grid, max(1, int(r * N))."""
    mask = torch.zeros((batch, size, size, size), dtype=torch.bool)
    for b in range(batch):
        s = base if torch.rand((), generator=gen) < 0.5 else base * 2
        n = size // s
        k = max(1, int(ratio * n ** 3))
        for idx in torch.randperm(n ** 3, generator=gen)[:k]:
            z, y, x = (idx // (n * n)) * s, ((idx % (n * n)) // n) * s, (idx % n) * s
            mask[b, z:z + s, y:y + s, x:x + s] = True
    return mask


def sample_sizes(mask: torch.Tensor) -> list[int]:
    """Per sample, the largest of (16, 8) whose aligned cubes are each all or nothing."""
    sizes = []
    for m in mask:
        c16 = cubes(m[None], 16)[0]
        sizes.append(16 if torch.all(c16.all(-1) | ~c16.any(-1)) else 8)
    return sizes


@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.55])
def test_sample_mask_one_size_per_sample_and_paper_block_count(ratio):
    mask = generate_sample_block_mask(64, (64, 64, 64), [8, 16], ratio, generator=4)
    sizes = sample_sizes(mask)
    for m, s in zip(mask, sizes):
        c = cubes(m[None], s)[0]
        assert torch.all(c.all(-1) | ~c.any(-1)), "a block is not aligned to its own size"
        n = (64 // s) ** 3
        assert int(c.all(-1).sum()) == max(1, int(ratio * n))  # exactly the paper's count of blocks
    # the coin flip: both sizes, each for about half of the samples (binomial(64, 0.5): 20..44 at p > 0.999)
    assert 20 <= sizes.count(16) <= 44, sizes


def test_sample_mask_matches_the_paper_loop_in_distribution():
    """Per-voxel masking frequency and the masked fraction per size agree with the transcribed loop."""
    gen = torch.Generator().manual_seed(0)
    ref = paper_patch_mask(400, 32, 8, 0.3, gen)
    ours = generate_sample_block_mask(400, (32, 32, 32), [8, 16], 0.3, generator=1)
    assert sorted(set(ref.float().mean(dim=(1, 2, 3)).tolist())) == \
        sorted(set(ours.float().mean(dim=(1, 2, 3)).tolist())) == [0.25, 0.296875]
    # every voxel is masked with the same probability (~0.27), in both
    for m in (ref, ours):
        per_voxel = m.float().mean(0)
        assert abs(float(per_voxel.mean()) - 0.273) < 0.01 and float(per_voxel.std()) < 0.05


def test_sample_mask_minimum_one_block_seeded_and_dispatch():
    assert int(generate_sample_block_mask(2, (32, 32, 32), [16], 0.0, generator=0).sum()) == 2 * 16 ** 3
    a = generate_sample_block_mask(3, (32, 32, 32), [8, 16], 0.3, generator=5)
    assert torch.equal(a, generate_sample_block_mask(3, (32, 32, 32), [8, 16], 0.3, generator=5))
    cfg = MaskConfig(size_choice="sample")
    assert torch.equal(block_mask(cfg, 3, (32, 32, 32), 0.3, generator=5), a)
    assert torch.equal(block_mask(MaskConfig(), 2, (32, 32, 32), 0.5, generator=7),
                       generate_block_mask(2, (32, 32, 32), [8, 16], 0.5, generator=7))
    with pytest.raises(ValueError, match="divisible"):
        generate_sample_block_mask(1, (40, 32, 32), [8, 16], 0.5)
