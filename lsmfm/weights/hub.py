"""Hugging Face Hub integration: `save_pretrained` / `from_pretrained` / `push_to_hub` on every backbone.

`HubMixin` builds on huggingface_hub's `ModelHubMixin` (which supplies `push_to_hub(repo_id)`) and
writes our format: `model.safetensors` with MONAI's key names, our `config.json` (a `ModelConfig`) and
a model card, atomically. `from_pretrained` is `lsmfm.load_pretrained` plus a type check, so a Hub
repository, a local folder, a file and a registered release mean the same for both.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import ModelHubMixin

from lsmfm.errors import ConfigError, InputError

T = TypeVar("T", bound="HubMixin")


class HubMixin(ModelHubMixin, library_name="lsmfm",
               tags=["light-sheet-microscopy", "3d", "foundation-model", "lsmfm"]):
    """Adds Hub-style save/load/push in the lsmfm format to a backbone class."""

    def save_pretrained(self, save_directory: str | Path, *, config: Any = None,
                        model_card: str | None = None, overwrite: bool = False,
                        model_card_kwargs: dict[str, Any] | None = None, **fields: Any) -> Path:
        """Save in the released format, atomically (temporary folder, then rename); returns the folder.

        Args:
            config: the `ModelConfig` to record; default: the one the backbone was loaded with, else one
                built from its architecture.
            model_card: README.md text; default: rendered from the config and the tensors.
            overwrite: replace an existing folder (else an existing folder is an error).
            model_card_kwargs: accepted for huggingface_hub's `push_to_hub`; the card is rendered from
                the config.
            fields: ModelConfig fields to override, e.g. `patch_size=[64, 64, 64]`, `voxel_size=...`.
        """
        import dataclasses

        from lsmfm.weights.format import config_for, save_model_dir

        cfg = config if config is not None else config_for(self)
        if fields:
            try:
                cfg = dataclasses.replace(cfg, **fields)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"save_pretrained: {exc}") from exc
        return save_model_dir(save_directory, self.state_dict(), cfg, model_card, overwrite=overwrite)

    @classmethod
    def from_pretrained(cls: type[T], pretrained_model_name_or_path: str | Path, *, which: str | None = None,
                        map_location: str = "cpu", revision: str | None = None, **hub_kwargs: Any) -> T:
        """`lsmfm.load_pretrained(...)`, checked to be this class (see `lsmfm.weights.load`)."""
        from lsmfm.weights.load import load_pretrained

        net = load_pretrained(pretrained_model_name_or_path, which=which, map_location=map_location,
                              revision=revision, **hub_kwargs)
        if not isinstance(net, cls):
            raise InputError(pretrained_model_name_or_path,
                             f"holds a {type(net).__name__}, not a {cls.__name__}")
        return net
