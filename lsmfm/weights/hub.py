"""Hugging Face Hub integration: `save_pretrained` / `from_pretrained` / `push_to_hub` on every backbone.

`HubMixin` builds on huggingface_hub's `ModelHubMixin` (which supplies `save_pretrained(dir)` and
`push_to_hub(repo_id)`) and writes our format: `model.safetensors` with MONAI's key names, our
`config.json` (a `ModelConfig`) and a model card. Loading goes through `lsmfm.load_pretrained`, so a
Hub repository, a local folder and a registered release give the same, strictly checked network.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from huggingface_hub import ModelHubMixin

from lsmfm.errors import InputError

HF_PREFIX = "hf-hub:"
T = TypeVar("T", bound="HubMixin")


def snapshot(repo: str, revision: str | None = None, **hub_kwargs: Any) -> Path:
    """Download (or reuse from the HF cache) the weights folder of `org/name[@revision]`."""
    from huggingface_hub import snapshot_download

    from lsmfm.weights.format import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

    repo_id, _, rev = repo.partition("@")
    try:
        path = snapshot_download(repo_id=repo_id, revision=revision or rev or None,
                                 allow_patterns=[WEIGHTS_NAME, CONFIG_NAME, CARD_NAME], **hub_kwargs)
    except Exception as exc:  # offline, missing repo, auth: all reported the same way
        raise InputError(HF_PREFIX + repo, f"could not fetch from the Hugging Face Hub: {exc}") from exc
    return Path(path)


class HubMixin(ModelHubMixin, library_name="lsmfm",
               tags=["light-sheet-microscopy", "3d", "foundation-model", "lsmfm"]):
    """Adds Hub-style save/load/push in the lsmfm format to a backbone class."""

    def _save_pretrained(self, save_directory: Path) -> None:
        from lsmfm.weights.format import config_for, write_model_files

        write_model_files(save_directory, self.state_dict(), config_for(self))

    @classmethod
    def from_pretrained(cls: type[T], pretrained_model_name_or_path: str | Path, *, which: str | None = None,
                        map_location: str = "cpu", revision: str | None = None, **hub_kwargs: Any) -> T:
        """Load from a local folder or file, a registered release, or a Hub id (`[hf-hub:]org/name`)."""
        return cls._from_pretrained(model_id=str(pretrained_model_name_or_path), revision=revision,
                                    which=which, map_location=map_location, **hub_kwargs)

    @classmethod
    def _from_pretrained(cls: type[T], *, model_id: str, revision: str | None = None,
                         which: str | None = None, map_location: str = "cpu", **hub_kwargs: Any) -> T:
        from lsmfm.weights.load import load_pretrained
        from lsmfm.weights.registry import RELEASES

        source: str | Path = model_id
        if model_id.startswith(HF_PREFIX) or (not Path(model_id).exists() and model_id not in RELEASES
                                              and model_id.count("/") == 1):
            source = snapshot(model_id.removeprefix(HF_PREFIX), revision, **hub_kwargs)
        net = load_pretrained(source, which=which, map_location=map_location)
        if not isinstance(net, cls):
            raise InputError(model_id, f"holds a {type(net).__name__}, not a {cls.__name__}")
        return net
