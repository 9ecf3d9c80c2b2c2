"""DINOv2 and DINOv3 ViTs (transformers `Dinov2Model`, `DINOv3ViTModel`) as segmentation encoders."""

from __future__ import annotations

from typing import Any

import torch

from lsmfm.baselines2d.config import ModelConfig
from lsmfm.baselines2d.models.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BlockLayout,
    TokenSegmenter,
    check_input_size,
    load_hf,
    transformers_module,
)
from lsmfm.errors import ConfigError

_LAYOUT = BlockLayout(
    attention="attention",
    attn_out="attention.o_proj",
    mlp="mlp",
    norms=("norm1", "norm2"),
    q="attention.q_proj",
    k="attention.k_proj",
    v="attention.v_proj",
)

DINOV2_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "mlp_ratio": 2,
        "image_size": 112,
    },
    "vit_b": {},
    "vit_l": {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16},
}
DINOV3_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "image_size": 128,
        "num_register_tokens": 4,
    },
    "vit_b": {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_attention_heads": 12,
        "num_register_tokens": 4,
    },
    "vit_l": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "num_register_tokens": 4,
    },
    "vit_h": {
        "hidden_size": 1280,
        "intermediate_size": 5120,
        "num_hidden_layers": 32,
        "num_attention_heads": 20,
        "num_register_tokens": 4,
        "use_gated_mlp": True,
    },
}


class Dinov2Segmenter(TokenSegmenter):
    name = "dinov2"
    layers_path = "encoder.layer"
    layout = _LAYOUT
    n_prefix = 1


class Dinov3Segmenter(TokenSegmenter):
    name = "dinov3"
    layers_path = "model.layer"
    layout = _LAYOUT

    def __init__(self, encoder: Any, input_size: int) -> None:
        super().__init__(encoder, input_size, int(encoder.config.patch_size), IMAGENET_MEAN, IMAGENET_STD)
        self.n_prefix = 1 + int(encoder.config.num_register_tokens)

    def train(self, mode: bool = True) -> Dinov3Segmenter:
        """RoPE jitter/rescale is a pretraining augmentation: finetuning keeps exact patch positions."""
        super().train(mode)
        self.encoder.rope_embeddings.eval()
        return self


def build_dinov2(cfg: ModelConfig) -> Dinov2Segmenter:
    """DINOv2 from `cfg.weights` (e.g. facebook/dinov2-base) or random weights of `cfg.size`."""
    transformers = transformers_module()

    encoder = _build(cfg, transformers.Dinov2Model, transformers.Dinov2Config, DINOV2_SIZES, "dinov2 comes in vit_s/b/l/g")
    patch = int(encoder.config.patch_size)
    size = check_input_size("dinov2", cfg.input_size or int(encoder.config.image_size), patch)
    return Dinov2Segmenter(encoder, size, patch, IMAGENET_MEAN, IMAGENET_STD)


def build_dinov3(cfg: ModelConfig) -> Dinov3Segmenter:
    """DINOv3 from `cfg.weights` (e.g. facebook/dinov3-vitb16-pretrain-lvd1689m) or random weights."""
    transformers = transformers_module()

    encoder = _build(cfg, transformers.DINOv3ViTModel, transformers.DINOv3ViTConfig, DINOV3_SIZES, "")
    size = check_input_size(
        "dinov3", cfg.input_size or int(encoder.config.image_size), int(encoder.config.patch_size)
    )
    return Dinov3Segmenter(encoder, size)


def _build(
    cfg: ModelConfig, model_cls: Any, config_cls: Any, sizes: dict[str, dict[str, Any]], note: str
) -> Any:
    if cfg.weights:
        return load_hf(model_cls, cfg.weights)
    if cfg.size not in sizes:
        raise ConfigError(
            f"model.size={cfg.size} is not available for model.name={cfg.name}"
            f"{' (' + note + ')' if note else ''}; choose one of {sorted(sizes)}"
        )
    torch.manual_seed(cfg.init_seed)
    return model_cls(config_cls(**sizes[cfg.size]))
