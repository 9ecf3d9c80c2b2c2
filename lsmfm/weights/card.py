"""Model cards (a weights folder's README.md, also the Hub's): what the network is, what it learnt from, how
well it did, what it is for and not for, how to load and cite it, and which lsmfm wrote it.

The Hub reads the front matter: `license`, `library_name`, `tags`, and `base_model` for finetuned models.
Every value comes from the folder's `ModelConfig` and tensors; a finetuned model's `task["finetuning"]`
(written by `lsmfm finetune`) adds its base model, training data and the few-shot results of its run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

if TYPE_CHECKING:  # format.py renders cards: only the type is needed here
    from lsmfm.weights.format import ModelConfig

LICENCE = "mit"  # lsmfm's own licence (LICENSE); the training data's licences are in their catalogs


def _listing(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "(none recorded)"
    return str(value)


def base_model(config: ModelConfig) -> str | None:
    """The pretrained weights a finetuned model started from (a Hub id without `hf-hub:`, a release
    name or a path), or None (pretrained backbones, models trained from scratch)."""
    source = ((config.task or {}).get("finetuning") or {}).get("base_model")
    return str(source).removeprefix("hf-hub:") if source else None


def front_matter(config: ModelConfig) -> list[str]:
    tags = ["light-sheet-microscopy", "3d", "lsmfm", config.backbone.arch]
    tags += [f"finetuned-{config.task['name']}"] if config.task else ["foundation-model", "self-supervised"]
    lines = ["---", f"license: {LICENCE}", "library_name: lsmfm", f"tags: [{', '.join(tags)}]"]
    if base_model(config):
        lines.append(f"base_model: {base_model(config)}")
    return [*lines, "---"]


def summary_lines(config: ModelConfig, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    n_params = sum(int(t.numel()) for t in state_dict.values() if t.is_floating_point())
    norm = config.normalize
    voxel = "not recorded" if config.voxel_size is None else " x ".join(map(str, config.voxel_size)) + " µm"
    lines = [
        f"- Architecture: {config.backbone.card_line()} ({n_params / 1e6:.2f} M values in floating tensors)",
        f"- Patch size (z, y, x): {' x '.join(map(str, config.patch_size))} voxels; voxel size: {voxel}",
        f"- Normalisation: percentiles {norm.lower}-{norm.upper} to [0, 1]{', clipped' if norm.clip else ''}",
    ]
    if config.backbone.input_scale != 1.0:
        lines.append(f"- Input scale: inputs are resized by {config.backbone.input_scale:.4g} before the "
                     "network (its pretraining voxel scale) and its output resized back")
    if config.backbone.axes == "xyz":
        lines.append("- Axis order: trained on (x, y, z) arrays (nibabel's order); lsmfm passes (z, y, x) "
                     "arrays and transposes them at the network's boundary")
    pre = config.pretraining
    if pre:
        lines += [
            f"- Pretraining mode: {pre.get('mode', 'unknown')}; recipe: {pre.get('recipe', 'unknown')}",
            f"- Weights: the {pre.get('which', 'unknown')} network"
            + (f" ({pre['which_reason']})" if "which_reason" in pre else "")
            + (f", after {pre['steps']} optimizer steps" if "steps" in pre else "")
            + (f"; source checkpoint: {pre['source_checkpoint']}" if "source_checkpoint" in pre else ""),
        ]
    if config.task is not None:
        lines.append(f"- Finetuned for: {config.task['name']} (weights `backbone.*` + `head.*`)")
    return lines


def training_data_lines(config: ModelConfig) -> list[str]:
    pre = config.pretraining
    lines = ["## Training data", ""]
    if pre:
        lines.append(f"- Pretraining (catalog: entry ids): {_listing(pre.get('data', []))}")
    tuned = (config.task or {}).get("finetuning") or {}
    if tuned:
        lines += [f"- Finetuning: {tuned.get('data', 'not recorded')}",
                  f"- Few-shot run: {tuned.get('shots', '?')} training patch(es) "
                  f"({_listing(tuned.get('train_patches', []))}), seed {tuned.get('seed', '?')}, "
                  f"{tuned.get('init', '?')} initialisation"
                  + (f" from {tuned['base_model']}" if tuned.get("base_model") else "")]
    if len(lines) == 2:
        lines.append("- Not recorded with these weights.")
    return lines


def results_lines(config: ModelConfig, table: str | None) -> list[str]:
    tuned = (config.task or {}).get("finetuning") or {}
    if not tuned.get("test_metrics") and not table:
        return []
    lines = ["## Results", ""]
    if tuned.get("test_metrics"):
        lines.append("This model on the run's held-out test images: "
                     + ", ".join(f"{k} {v:.3f}" for k, v in tuned["test_metrics"].items()) + ".")
    if table:
        lines += ["", "The few-shot protocol it comes from (test metrics, mean ± std over seeds; pretrained "
                      "against the same network from scratch):", "", table]
    return [*lines, ""]


def use_lines(config: ModelConfig) -> list[str]:
    if config.task is not None:
        from lsmfm.tasks.registry import task_class

        spec = task_class(config.task["name"])
        how = ("with `lsmfm predict` or its bioimage.io package (`lsmfm export --format bioimageio`)"
               if spec.volume_output is not None else "with `load_task_model`")
        return ["## Intended use and limits", "",
                f"Intended for {spec.summary} of 3D light-sheet fluorescence microscopy volumes like its "
                f"training data (same voxel size, stain and tissue), {how}.",
                "A few-shot model learnt from a handful of patches: check it on annotated volumes of your "
                "own before relying on it; on other data its accuracy is unknown. Not for clinical use.", ""]
    return ["## Intended use and limits", "",
            "A 3D backbone pretrained without labels on light-sheet volumes: the starting point for few-shot "
            "finetuning (`lsmfm finetune segment|classify|deblur`, compared there against the same "
            "network from scratch) and a feature extractor for volumes like its pretraining data.",
            "It predicts nothing by itself. Inputs must be normalised as recorded above; far from its "
            "pretraining data (voxel size, stains, tissue) its features may not transfer. Not for clinical "
            "use.",
            ""]


def citation_lines(config: ModelConfig) -> list[str]:
    from lsmfm.citation import PAPER, PAPER_CODE_URL, PAPER_URL, lsmfm_citation
    from lsmfm.provenance import provenance

    record = config.provenance or provenance()
    commit = record.get("git_commit")
    dirty = ", with uncommitted changes" if record.get("git_dirty") else ""
    written = f"lsmfm {record.get('lsmfm_version', '?')}" + (f" (git {commit}{dirty})" if commit else "")
    return ["## Citation and links", "",
            f"- {PAPER}: {PAPER_URL}; its code: {PAPER_CODE_URL}",
            f"- {lsmfm_citation()} (see its CITATION.cff)",
            "", "## Provenance", "", f"Written by {written}.", ""]


LOAD_BACKBONE = ["## Load", "", "```python", "import lsmfm",
                 'backbone = lsmfm.load_pretrained("path/to/this/folder")  # or "hf-hub:<org>/<name>"',
                 "cfg = backbone.lsmfm_config  # patch_size, voxel_size, normalize, pretraining", "```", ""]


def render_model_card(config: ModelConfig, state_dict: Mapping[str, torch.Tensor],
                      title: str = "lsmfm 3D light-sheet backbone", extra: list[str] | None = None,
                      load: list[str] | None = None, results_table: str | None = None) -> str:
    """Markdown with Hub front matter; `extra`: summary items a caller adds (a task's `card_lines`),
    `load`: the how-to-load section (default: `load_pretrained` of a backbone), `results_table`: the
    few-shot results of a finetuned model's run."""
    lines = [*front_matter(config), f"# {title}", "", *summary_lines(config, state_dict),
             *(f"- {line}" for line in extra or []), ""]
    lines += training_data_lines(config) + [""] + results_lines(config, results_table) + use_lines(config)
    return "\n".join(lines + (load or LOAD_BACKBONE) + citation_lines(config))
