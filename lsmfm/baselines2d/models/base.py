"""What every 2D baseline shares: a ViT encoder that PEFT methods adapt, and a decoder trained on top.

A `Segmenter2D` maps normalised RGB images (B, 3, S, S) to foreground logits (B, 1, S, S). PEFT methods
find the parts they change through the model's `BlockLayout` (dotted paths inside one transformer
layer), so one method implementation serves SAM, DINOv2, DINOv3 and CLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lsmfm.errors import ConfigError, InputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BlockLayout:
    """Dotted paths, inside one transformer layer, of the parts PEFT methods touch.

    Args:
        attention: the attention module (attention tuning trains all of it).
        attn_out: the attention output projection.
        mlp: the feed-forward module (AdaptFormer puts its adapter beside it).
        norms: the layer's LayerNorms.
        qkv: the fused query-key-value projection (SAM), or "" when q, k, v are separate.
        q, k, v: separate projections (DINOv2, DINOv3, CLIP), or "".
    """

    attention: str
    attn_out: str
    mlp: str
    norms: tuple[str, ...]
    qkv: str = ""
    q: str = ""
    k: str = ""
    v: str = ""


class Segmenter2D(nn.Module):
    """A foundation-model encoder with a decoder (`head`) for binary 2D segmentation.

    Subclasses set `encoder`, `layers_path`, `layout` and implement `encoder_features` (the final
    feature map) and `tokens_to_map` (one layer's output as a feature map). The head is called as
    `head(pixels, final, taps)`, where `taps` are the outputs of the layers listed in `head.taps`.
    """

    name: str = ""
    layout: BlockLayout
    layers_path: str

    def __init__(
        self,
        encoder: nn.Module,
        input_size: int,
        patch_size: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.input_size = input_size
        self.patch_size = patch_size
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.head: nn.Module = nn.Identity()

    @property
    def layers(self) -> nn.ModuleList:
        return self.encoder.get_submodule(self.layers_path)

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    @property
    def feature_channels(self) -> int:
        """Channels of `encoder_features` (SAM: its neck's output; ViTs: the hidden size)."""
        return self.hidden_size

    def encoder_features(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def tokens_to_map(self, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) intensities in [0, 1] -> (B, 3, S, S): resized, replicated to RGB, normalised."""
        s = self.input_size
        if images.shape[-2:] != (s, s):
            images = F.interpolate(
                images,
                size=(s, s),
                mode="bilinear",
                align_corners=False,
                antialias=bool(images.shape[-1] > s),
            )
        return (images.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std

    def encode(
        self, pixels: torch.Tensor, taps: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Final feature map and the outputs of layers `taps` as maps (no autograd through a frozen
        encoder)."""
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        captured: dict[int, torch.Tensor] = {}
        hooks = [self.layers[i].register_forward_hook(_capture(captured, i)) for i in taps]
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.encoder.parameters())
        try:
            with torch.set_grad_enabled(grad):
                final = self.encoder_features(pixels)
        finally:
            for h in hooks:
                h.remove()
        return final, [self.tokens_to_map(captured[i], grid) for i in taps]

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        final, maps = self.encode(pixels, tuple(getattr(self.head, "taps", ())))
        return self.head(pixels, final, maps)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) images in [0, 1] -> (B, 1, H, W) logits at the images' own resolution."""
        out = self(self.preprocess(images))
        if out.shape[-2:] != images.shape[-2:]:
            out = F.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return out


def _capture(store: dict[int, torch.Tensor], index: int) -> Any:
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store[index] = output[0] if isinstance(output, tuple) else output

    return hook


class TokenSegmenter(Segmenter2D):
    """A plain ViT (DINOv2, DINOv3, CLIP): `n_prefix` class/register tokens, then one token per patch."""

    n_prefix: int = 1

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    def encoder_features(self, pixels: torch.Tensor) -> torch.Tensor:
        grid = (pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size)
        return self.tokens_to_map(self.run_encoder(pixels), grid)

    def run_encoder(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values=pixels).last_hidden_state

    def tokens_to_map(self, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, _, c = hidden.shape
        # contiguous: torch 2.13's CPU GroupNorm backward crashes on this strided view
        return hidden[:, self.n_prefix :].transpose(1, 2).reshape(b, c, *grid).contiguous()


class LightHead(nn.Module):
    """Light segmentation head on the final ViT features: 1x1 projection, two 2x transposed convs, 1x1 out."""

    taps: tuple[int, ...] = ()

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, in_channels)
        self.proj = nn.Conv2d(in_channels, dim, 1)
        self.up1 = nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)
        self.up2 = nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)
        self.out = nn.Conv2d(dim // 4, 1, 1)

    def forward(self, pixels: torch.Tensor, final: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        x = F.gelu(self.proj(self.norm(final)))
        x = F.gelu(self.up2(F.gelu(self.up1(x))))
        return F.interpolate(self.out(x), size=pixels.shape[-2:], mode="bilinear", align_corners=False)


def transformers_module() -> Any:
    """`transformers`, which every 2D baseline encoder comes from (`pip install 'lsmfm[baselines]'`)."""
    from lsmfm.extras import require

    return require("transformers", "baselines", "the 2D baselines")


def load_hf(cls: Any, weights: str) -> Any:
    """`cls.from_pretrained(weights)` (a folder or hub id), with an error that names the source."""
    try:
        return cls.from_pretrained(weights)
    except (OSError, ValueError) as exc:
        where = (
            "folder" if Path(weights).exists() else "hub id (downloads need network; set HF_HUB_OFFLINE=0)"
        )
        raise InputError(weights, f"cannot load {cls.__name__} weights from this {where}: {exc}") from exc


def check_input_size(name: str, size: int, patch: int) -> int:
    if size % patch:
        raise ConfigError(f"model.input_size={size} must be a multiple of {name}'s patch size {patch}")
    return size
