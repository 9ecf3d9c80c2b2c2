"""The one registry of PEFT methods, by name (`peft.method`), as in the PEFT-SAM comparison.

Each entry names the module that implements it (imported only when used, so reading a config stays
light), a one-line summary for `lsmfm baseline2d --list`, the models and decoders it applies to, and
whether the decoder is trained alongside. Every module defines `apply(model, cfg) -> None`, which
changes a frozen `Segmenter2D` in place so that exactly the method's parameters are trainable.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

ALL_MODELS = ("sam", "dinov2", "dinov3", "clip")
ALL_DECODERS = ("default", "efficell")


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: where it lives and what it applies to."""

    module: str
    summary: str
    models: tuple[str, ...] = ALL_MODELS
    decoders: tuple[str, ...] = ALL_DECODERS
    train_decoder: bool = True

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


_PKG = "lsmfm.baselines2d.methods"

METHODS: dict[str, MethodInfo] = {
    "lora": MethodInfo(f"{_PKG}.lora", "LoRA on q and v of every attention layer (peft.rank, peft.alpha)"),
    "qlora": MethodInfo(f"{_PKG}.qlora", "LoRA over 4-bit NF4 encoder weights (bitsandbytes: lsmfm[qlora])"),
    "adaptformer": MethodInfo(
        f"{_PKG}.adaptformer", "bottleneck adapter beside every MLP (peft.adapter_dim)"
    ),
    "ssf": MethodInfo(f"{_PKG}.ssf", "scale and shift after every projection, MLP layer and LayerNorm"),
    "fact": MethodInfo(f"{_PKG}.fact", "FacT: q and v updates from factors shared across layers (peft.rank)"),
    "attention_tuning": MethodInfo(f"{_PKG}.attention_tuning", "train all attention weights of the encoder"),
    "bias_tuning": MethodInfo(f"{_PKG}.bias_tuning", "train the biases of the encoder's layers"),
    "layernorm_tuning": MethodInfo(
        f"{_PKG}.layernorm_tuning", "train the LayerNorms of the encoder's layers"
    ),
    "frozen": MethodInfo(f"{_PKG}.frozen", "frozen encoder, decoder only"),
    "full": MethodInfo(f"{_PKG}.full", "full finetuning of encoder and decoder"),
    "ptsam": MethodInfo(
        f"{_PKG}.ptsam",
        "prompt-tuned SAM: SAM frozen, learnable decoder tokens "
        "(peft.n_tokens) and optional deep encoder prompts (peft.encoder_tokens)",
        models=("sam",),
        decoders=("default",),
        train_decoder=False,
    ),
}


def get_method(name: str) -> MethodInfo:
    """The registered method `name`; KeyError lists the known ones."""
    if name not in METHODS:
        raise KeyError(f"unknown PEFT method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]
