"""Prompt-tuned SAM (PTSAM): SAM stays frozen; learnable tokens replace the prompt encoder.

`peft.n_tokens` tokens (8 x 256 = 2,048 parameters for SAM) are appended to the mask decoder's token
stream. With `peft.encoder_tokens` > 0, deep visual prompt tuning adds that many tokens to every encoder
layer; windowed layers see the same tokens in every window (12 x 8 x 768 = 73,728 for ViT-B). Prompt
tokens act as extra keys and values: image tokens attend to them, and their own outputs are discarded,
as in VPT-deep. Relative position biases apply between image tokens only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lsmfm.baselines2d.config import PeftConfig
from lsmfm.baselines2d.models.base import Segmenter2D
from lsmfm.errors import ConfigError


class PromptedAttention(nn.Module):
    """SAM vision attention over [prompt tokens, image tokens] for the image tokens' queries."""

    def __init__(self, base_layer: nn.Module, n_tokens: int, patch_size: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        dim = base_layer.qkv.in_features
        bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + dim))
        self.prompts = nn.Parameter(torch.empty(n_tokens, dim).uniform_(-bound, bound))

    def forward(
        self, hidden_states: torch.Tensor, output_attentions: bool | None = None
    ) -> tuple[torch.Tensor, None]:
        attn = self.base_layer
        b, h, w, c = hidden_states.shape
        heads = attn.num_attention_heads
        qkv = attn.qkv(hidden_states).reshape(b, h * w, 3, heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        n = self.prompts.shape[0]
        pkv = attn.qkv(self.prompts)[:, c:].reshape(n, 2, heads, c // heads).permute(1, 2, 0, 3)
        key = torch.cat([pkv[0].expand(b, -1, -1, -1), key], dim=2)
        value = torch.cat([pkv[1].expand(b, -1, -1, -1), value], dim=2)
        bias = None
        if attn.use_rel_pos:
            rel = attn.get_decomposed_rel_pos(
                query.reshape(b * heads, h * w, -1), attn.rel_pos_h, attn.rel_pos_w, (h, w), (h, w)
            )
            bias = F.pad(rel.reshape(b, heads, h * w, h * w), (n, 0))
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
        out = out.permute(0, 2, 1, 3).reshape(b, h, w, c)
        return attn.proj(out), None


def apply(model: Segmenter2D, cfg: PeftConfig) -> None:
    head = model.head
    if not hasattr(head, "token_dim"):
        raise ConfigError(
            "peft.method=ptsam needs SAM with its mask decoder (model.name=sam, model.decoder=default)"
        )
    head.prompts = nn.Parameter(torch.randn(cfg.n_tokens, head.token_dim) * 0.02)
    if cfg.encoder_tokens:
        for layer in model.layers:
            layer.attn = PromptedAttention(layer.attn, cfg.encoder_tokens, model.patch_size)
