"""CLIP vision towers (transformers `CLIPVisionModel`; OpenCLIP weights converted to transformers format)."""

from __future__ import annotations

from typing import Any

import torch

from lsmfm.baselines2d.config import ModelConfig
from lsmfm.baselines2d.models.base import BlockLayout, TokenSegmenter, check_input_size, load_hf, transformers_module

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

CLIP_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 128,
        "patch_size": 16,
    },
    "vit_b": {"patch_size": 16},
    "vit_l": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "patch_size": 14,
    },
    "vit_h": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "patch_size": 14,
        "hidden_act": "gelu",
    },
}


class ClipSegmenter(TokenSegmenter):
    """CLIP's ViT with position embeddings interpolated to the input size; its patch tokens as features."""

    name = "clip"
    layers_path = "encoder.layers"
    layout = BlockLayout(
        attention="self_attn",
        attn_out="self_attn.out_proj",
        mlp="mlp",
        norms=("layer_norm1", "layer_norm2"),
        q="self_attn.q_proj",
        k="self_attn.k_proj",
        v="self_attn.v_proj",
    )
    n_prefix = 1

    def run_encoder(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state


def build_clip(cfg: ModelConfig) -> ClipSegmenter:
    """CLIP vision tower from `cfg.weights` (e.g. openai/clip-vit-base-patch16) or random weights."""
    transformers = transformers_module()

    if cfg.weights:
        encoder = load_hf(transformers.CLIPVisionModel, cfg.weights)
    else:
        torch.manual_seed(cfg.init_seed)
        encoder = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**CLIP_SIZES[cfg.size]))
    patch = int(encoder.config.patch_size)
    size = check_input_size("clip", cfg.input_size or int(encoder.config.image_size), patch)
    return ClipSegmenter(encoder, size, patch, CLIP_MEAN, CLIP_STD)
