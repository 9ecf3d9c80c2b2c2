"""Model cards (a weights folder's README.md): what the network is, what it learnt from, how to load it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:  # format.py renders cards: only the type is needed here
    from lsmfm.weights.format import ModelConfig


def _listing(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "(none recorded)"
    return str(value)


def render_model_card(config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                      title: str = "lsmfm 3D light-sheet backbone") -> str:
    """Markdown with Hub front matter; every value comes from `config` and the tensors."""
    n_params = sum(int(t.numel()) for k, t in state_dict.items() if t.is_floating_point())
    pre = config.pretraining
    norm = config.normalize
    voxel = "not recorded" if config.voxel_size is None else " x ".join(map(str, config.voxel_size)) + " µm"
    lines = [
        "---",
        "library_name: lsmfm",
        "tags: [light-sheet-microscopy, 3d, foundation-model, self-supervised]",
        "---",
        f"# {title}",
        "",
        f"- Architecture: {config.backbone.card_line()} ({n_params / 1e6:.2f} M values in floating tensors)",
        f"- Patch size (z, y, x): {' x '.join(map(str, config.patch_size))} voxels; voxel size: {voxel}",
        f"- Normalisation: percentiles {norm.lower}-{norm.upper} to [0, 1]{', clipped' if norm.clip else ''}",
    ]
    if pre:
        lines += [
            f"- Pretraining mode: {pre.get('mode', 'unknown')}; recipe: {pre.get('recipe', 'unknown')}",
            f"- Data sources: {_listing(pre.get('data', []))}",
            f"- Weights: the {pre.get('which', 'unknown')} network"
            + (f", after {pre['steps']} optimizer steps" if "steps" in pre else "")
            + (f"; source checkpoint: {pre['source_checkpoint']}" if "source_checkpoint" in pre else ""),
        ]
    if config.task is not None:
        lines.append(f"- Finetuned for: {config.task['name']} (weights `backbone.*` + `head.*`)")
    lines += [
        "",
        "## Load",
        "",
        "```python",
        "import lsmfm",
        'backbone = lsmfm.load_pretrained("path/to/this/folder")  # or "hf-hub:<org>/<name>"',
        "cfg = backbone.lsmfm_config  # patch_size, voxel_size, normalize, pretraining",
        "```",
        "",
    ]
    return "\n".join(lines)
