"""SAM (ViT-B/L/H) for automatic segmentation without user prompts.

The prompt encoder is dropped: its "no mask" embedding is kept as a constant dense prompt, the sparse
prompts are empty (or PTSAM's learnable tokens), and the mask decoder's first mask token gives the
foreground logits. The image encoder is what PEFT methods adapt.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lsmfm.baselines2d.config import ModelConfig
from lsmfm.baselines2d.models.base import IMAGENET_MEAN, IMAGENET_STD, BlockLayout, Segmenter2D, load_hf, transformers_module
from lsmfm.errors import ConfigError, InputError

# Vision-encoder settings per size (ViT-B is transformers' default SamConfig); "tiny" is for tests and demos.
SAM_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "vision": {
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "image_size": 128,
            "window_size": 4,
            "global_attn_indexes": [1, 3],
            "output_channels": 64,
            "num_pos_feats": 32,
            "mlp_dim": 128,
        },
        "prompt": {"hidden_size": 64, "image_size": 128, "mask_input_channels": 4},
        "decoder": {"hidden_size": 64, "mlp_dim": 128, "num_attention_heads": 4, "iou_head_hidden_dim": 64},
    },
    "vit_b": {"vision": {}},
    "vit_l": {
        "vision": {
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "global_attn_indexes": [5, 11, 17, 23],
        }
    },
    "vit_h": {
        "vision": {
            "hidden_size": 1280,
            "num_hidden_layers": 32,
            "num_attention_heads": 16,
            "global_attn_indexes": [7, 15, 23, 31],
        }
    },
}


def sam_config(size: str, input_size: int = 0) -> Any:
    """transformers SamConfig for `size`; random encoders use init std 0.02 (SAM's default 1e-10 would
    make them constant)."""

    spec = SAM_SIZES[size]
    vision = {"initializer_range": 0.02, **spec["vision"]}
    prompt = dict(spec.get("prompt", {}))
    if input_size:
        vision["image_size"] = prompt["image_size"] = input_size
    return transformers_module().SamConfig(
        vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=spec.get("decoder", {})
    )


def build_sam(cfg: ModelConfig) -> SamSegmenter:
    """SAM from `cfg.weights` (transformers format) or random weights of `cfg.size`."""
    SamModel = transformers_module().SamModel

    if cfg.weights:
        sam = load_hf(SamModel, cfg.weights)
        native = sam.config.vision_config.image_size
        if cfg.input_size and cfg.input_size != native:
            raise InputError(
                cfg.weights,
                f"SAM's input size is fixed by its weights ({native}); "
                f"model.input_size={cfg.input_size} does not match",
            )
    else:
        if cfg.input_size and cfg.input_size % 16:
            raise ConfigError(f"model.input_size={cfg.input_size} must be a multiple of SAM's patch size 16")
        torch.manual_seed(cfg.init_seed)
        sam = SamModel(sam_config(cfg.size, cfg.input_size))
    return SamSegmenter(sam)


class SamMaskHead(nn.Module):
    """SAM's mask decoder without a prompt encoder: constant dense prompt, optional learnable sparse
    tokens."""

    taps: tuple[int, ...] = ()

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.mask_decoder = sam.mask_decoder
        with torch.no_grad():
            self.register_buffer("image_pe", sam.get_image_wide_positional_embeddings().detach().clone())
            self.register_buffer(
                "no_mask", sam.prompt_encoder.no_mask_embed.weight.detach().clone().view(1, -1, 1, 1)
            )
        self.register_parameter("prompts", None)

    def unused_modules(self) -> list[nn.Module]:
        """Parts that never reach the single-mask output (IoU head, multimask hypernetworks): never
        trained."""
        return [self.mask_decoder.iou_prediction_head, *self.mask_decoder.output_hypernetworks_mlps[1:]]

    @property
    def token_dim(self) -> int:
        return int(self.mask_decoder.hidden_size)

    def forward(self, pixels: torch.Tensor, final: torch.Tensor, taps: list[torch.Tensor]) -> torch.Tensor:
        b, c, h, w = final.shape
        tokens = self.prompts if self.prompts is not None else final.new_zeros(0, c)
        sparse = tokens.expand(b, 1, -1, -1)
        dense = self.no_mask.expand(b, -1, h, w)
        masks, _ = self.mask_decoder(
            final, self.image_pe.expand(b, -1, -1, -1), sparse, dense, multimask_output=False
        )
        return F.interpolate(masks[:, 0], size=pixels.shape[-2:], mode="bilinear", align_corners=False)


class SamSegmenter(Segmenter2D):
    """SAM image encoder (windowed ViT with a conv neck) and, by default, SAM's mask decoder."""

    name = "sam"
    layers_path = "layers"
    layout = BlockLayout(
        attention="attn",
        attn_out="attn.proj",
        mlp="mlp",
        norms=("layer_norm1", "layer_norm2"),
        qkv="attn.qkv",
    )

    def __init__(self, sam: nn.Module) -> None:
        vc = sam.config.vision_config
        super().__init__(
            sam.vision_encoder, int(vc.image_size), int(vc.patch_size), IMAGENET_MEAN, IMAGENET_STD
        )
        self._hidden = int(vc.hidden_size)
        self._out = int(vc.output_channels)
        self.head = SamMaskHead(sam)

    @property
    def hidden_size(self) -> int:
        return self._hidden

    @property
    def feature_channels(self) -> int:
        return self._out

    def encoder_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixels).last_hidden_state

    def tokens_to_map(self, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        return hidden.permute(0, 3, 1, 2).contiguous()
