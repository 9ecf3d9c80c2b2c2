"""The text side of the paper's image+text checkpoints: patches and prompts embedded in one space.

The paper's pretraining module (`pretrain_module_{unet,swinunetr}.py`) aligns
`normalize(image_proj(normalize(student(x), dim=1)))` with `normalize(text_proj(mean(BERT(prompt))))` by
a CLIP loss with a learnt `logit_scale`; its checkpoints keep all of it (`image_proj.*`: adaptive average
pool, flatten, Linear, ReLU, Linear, LayerNorm; `text_proj.*`: Linear, ReLU, Linear, LayerNorm;
`text_encoder.*`: the BERT, top layers finetuned; `logit_scale`). `load_image_text` rebuilds it:
the BERT's architecture and tokenizer come from `text_model` (its `hyper_parameters` name,
bert-base-uncased, downloaded on first use), its weights from the checkpoint.

Two choices, both the paper's: the image side uses the student by default (the projection was trained
on the student's features), and a prompt's embedding is the plain mean of its token states. The paper
padded prompts batch-wise, so pad tokens entered its means; here each prompt is encoded alone, which is
the paper's formula without padding, so an embedding does not depend on the other prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lsmfm.errors import InputError
from lsmfm.weights.paper import from_paper_checkpoint, is_paper_checkpoint

DEFAULT_TEXT_MODEL = "bert-base-uncased"


def _mlp(d_in: int, d: int, pooled: bool) -> nn.Sequential:
    head = [nn.Linear(d_in, d), nn.ReLU(), nn.Linear(d, d), nn.LayerNorm(d)]
    return nn.Sequential(*([nn.AdaptiveAvgPool3d(1), nn.Flatten()] if pooled else []), *head)


class PaperImageText(nn.Module):
    """A paper image+text checkpoint: `encode_image` (B, E), `encode_text` (N, E), `logits` (B, N).

    Example:
        >>> model = load_image_text("unet_image_text_best.ckpt")
        >>> probs = model.logits(patches, ["nuclear stain", "vascular stain"]).softmax(-1)
    """

    def __init__(
        self,
        backbone: nn.Module,
        image_proj: nn.Module,
        text_encoder: nn.Module,
        tokenizer: Any,
        text_proj: nn.Module,
        logit_scale: torch.Tensor,
    ) -> None:
        super().__init__()
        self.backbone, self.image_proj = backbone, image_proj
        self.text_encoder, self.tokenizer, self.text_proj = text_encoder, tokenizer, text_proj
        self.register_buffer("logit_scale", logit_scale.detach().clone())

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, z, y, x) normalised patches -> (B, E) unit embeddings."""
        features = F.normalize(self.backbone(x), dim=1)
        return F.normalize(self.image_proj(features), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """Prompts -> (N, E) unit embeddings, each prompt encoded alone (no padding)."""
        device = self.logit_scale.device
        pooled = []
        for text in texts:
            tokens = self.tokenizer([text], truncation=True, return_tensors="pt").to(device)
            pooled.append(self.text_encoder(**tokens).last_hidden_state.mean(dim=1))
        return F.normalize(self.text_proj(torch.cat(pooled)), dim=-1)

    def scale(self) -> torch.Tensor:
        """The learnt temperature as the paper applies it: exp(logit_scale) clamped to [1e-3, 100]."""
        return self.logit_scale.exp().clamp(1e-3, 100.0)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """(B, N) scaled cosine similarities of patches and prompts (softmax: zero-shot probabilities)."""
        return self.scale() * self.encode_image(x) @ self.encode_text(texts).T


def load_image_text(
    path: str | Path,
    which: str = "student",
    text_model: str | None = None,
    map_location: str | torch.device = "cpu",
) -> PaperImageText:
    """Rebuild a paper image+text checkpoint's joint embedding (see the module docstring).

    Args:
        path: the `.ckpt` file (or a registered release name, downloaded and verified).
        which: the image encoder: "student" (default: what `image_proj` was trained on), "teacher", "auto".
        text_model: where the BERT's config and tokenizer come from (a Hub id or a local folder); default:
            the checkpoint's `hyper_parameters.model.text_model_name` when that folder exists here, else
            its last path part (bert-base-uncased for the released checkpoints).
    """
    from lsmfm.models.backbones.registry import build_backbone
    from lsmfm.weights.load import load_strict
    from lsmfm.weights.torchfile import load_torch_file

    path = _resolve(path)
    obj = load_torch_file(path)
    if not is_paper_checkpoint(obj):
        raise InputError(path, "not a pretraining checkpoint of the LSM foundation model paper")
    ckpt = from_paper_checkpoint(obj, path, which)
    if not ckpt.text_state:
        raise InputError(path, "an image-only checkpoint: it has no text encoder or projections")
    backbone = build_backbone(ckpt.config.backbone)
    load_strict(backbone, ckpt.state_dict, str(path))
    backbone.lsmfm_config = ckpt.config
    parts = {p: _part(ckpt.text_state, p) for p in ("image_proj.", "text_proj.", "text_encoder.")}
    embed = ckpt.config.backbone.out_channels
    image_proj = _mlp(embed, embed, pooled=True)
    load_strict(image_proj, parts["image_proj."], f"{path} (image_proj)")
    name = text_model or _text_model_name(ckpt.hyper_parameters)
    encoder, tokenizer = _text_encoder(name, parts["text_encoder."], path)
    text_proj = _mlp(encoder.config.hidden_size, embed, pooled=False)
    load_strict(text_proj, parts["text_proj."], f"{path} (text_proj)")
    model = PaperImageText(
        backbone, image_proj, encoder, tokenizer, text_proj, ckpt.text_state["logit_scale"]
    )
    return model.to(map_location).eval()


def _resolve(path: str | Path) -> Path:
    from lsmfm.weights.registry import RELEASES

    if not Path(path).is_file() and str(path) in RELEASES:
        from lsmfm.weights.download import fetch_release

        return fetch_release(RELEASES[str(path)])
    return Path(path)


def _part(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _text_model_name(hp: Mapping[str, Any]) -> str:
    """The paper stored a local path (`../../setup/pretrained_models/bert-base-uncased`): use it when it
    exists here, else its last part as a Hub id."""
    model = hp.get("model") if isinstance(hp.get("model"), Mapping) else {}
    name = str(model.get("text_model_name") or DEFAULT_TEXT_MODEL)
    return name if Path(name).is_dir() else Path(name).name or DEFAULT_TEXT_MODEL


def _text_encoder(name: str, state: Mapping[str, torch.Tensor], path: Path) -> tuple[nn.Module, Any]:
    """The BERT built from `name`'s config (no weights downloaded) with the checkpoint's weights."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from lsmfm.weights.load import load_strict

    try:
        config = AutoConfig.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as exc:
        raise InputError(
            path,
            f"cannot get the text model {name!r} (its config and tokenizer; pass "
            f"text_model= a local folder or Hub id): {exc}",
        ) from exc
    encoder = AutoModel.from_config(config)
    load_strict(encoder, state, f"{path} (text_encoder, architecture of {name})")
    return encoder.eval(), tokenizer


def patch_windows(
    volume: torch.Tensor, read: Sequence[int], network: Sequence[int], normalize: Any
) -> torch.Tensor:
    """(C, z, y, x) -> (N, C, *network) windows as the paper preprocessed its patches: tiles of `read`
    voxels covering the volume (the last one flush with the end; a smaller volume is one tile), each
    normalised by its own percentiles and resized trilinearly to `network`."""
    from lsmfm.data.normalize import percentile_normalize

    starts = [
        sorted({*range(0, max(n - r, 0) + 1, r), max(n - r, 0)}) for n, r in zip(volume.shape[1:], read)
    ]
    tiles = []
    for z in starts[0]:
        for y in starts[1]:
            for x in starts[2]:
                tile = volume[:, z : z + read[0], y : y + read[1], x : x + read[2]].float()
                tile = torch.stack([percentile_normalize(c, normalize) for c in tile])
                tiles.append(
                    F.interpolate(tile[None], size=tuple(network), mode="trilinear", align_corners=False)[0]
                )
    return torch.stack(tiles)


def embed_volume(model: PaperImageText, path: str | Path, batch: int = 4) -> torch.Tensor:
    """One (E,) unit embedding of a volume file: the mean of its windows' embeddings, renormalised."""
    from lsmfm.io.volumes import read_volume

    array, _ = read_volume(path)
    volume = torch.from_numpy(array.astype("float32"))
    volume = volume[None] if volume.ndim == 3 else volume
    config = model.backbone.lsmfm_config
    network = list(config.patch_size)
    read = (config.pretraining.get("resize") or {}).get("read", network)
    windows = patch_windows(volume, read, network, config.normalize)
    device = model.logit_scale.device
    embeddings = torch.cat(
        [model.encode_image(windows[i : i + batch].to(device)) for i in range(0, len(windows), batch)]
    )
    return F.normalize(embeddings.mean(dim=0), dim=0)


def rank(
    model: PaperImageText, images: Sequence[str | Path], classes: Mapping[str, Sequence[str]]
) -> dict[str, Any]:
    """Zero-shot classification and retrieval: each image's classes by probability (a class's prompts
    averaged, CLIP's prompt ensembling), and each class's images by similarity."""
    names = list(classes)
    texts = torch.stack([F.normalize(model.encode_text(list(classes[n])).mean(dim=0), dim=0) for n in names])
    imgs = torch.stack([embed_volume(model, p) for p in images]).to(texts.device)
    sims = imgs @ texts.T
    probs = (model.scale() * sims).softmax(dim=-1)
    per_image = {
        str(p): sorted(
            (
                {"class": n, "similarity": float(sims[i, j]), "probability": float(probs[i, j])}
                for j, n in enumerate(names)
            ),
            key=lambda r: -r["probability"],
        )
        for i, p in enumerate(images)
    }
    per_class = {
        n: sorted(
            ({"image": str(p), "similarity": float(sims[i, j])} for i, p in enumerate(images)),
            key=lambda r: -r["similarity"],
        )
        for j, n in enumerate(names)
    }
    return {"logit_scale": float(model.scale()), "images": per_image, "classes": per_class}
