"""Domain analysis: how far apart datasets lie in an encoder's feature space.

Images from several datasets are cut into tiles (2D encoders: tiles of 2D images or of Z slices of
volumes; our 3D backbone: blocks of volumes, 2D tiles repeated along Z), embedded by mean-pooling the
encoder's final feature map, projected by PCA for a plot coloured by dataset, and scored by a
separability score: the cross-validated accuracy of a linear probe (multinomial logistic regression)
predicting the dataset from the embedding. Near chance, the encoder sees the datasets alike; near 1,
they are far apart for it. With a finetuned baseline2d run, the same is reported after adaptation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lsmfm.baselines2d.data import SUFFIXES, natural_sorted, read_array, split_name, tile_starts
from lsmfm.data.normalize import NormalizeConfig, percentile_normalize
from lsmfm.errors import InputError
from lsmfm.io.atomic import atomic_path, atomic_write_text

EMBED_BATCH = 8


@dataclass
class Embedder:
    """`embed(samples) -> (N, C)` for 2D tiles (kind "2d") or 3D blocks (kind "3d")."""

    label: str
    kind: str
    embed: Callable[[list[np.ndarray]], np.ndarray]
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)


def batches(samples: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Stacks of up to EMBED_BATCH samples of one shape (a dataset's embeddings are order-free)."""
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for s in samples:
        by_shape.setdefault(s.shape, []).append(s)
    for group in by_shape.values():
        for i in range(0, len(group), EMBED_BATCH):
            yield np.stack(group[i : i + EMBED_BATCH])


def embedder_2d(model: torch.nn.Module, label: str, device: torch.device) -> Embedder:
    """Mean-pooled final feature map of a `Segmenter2D`'s encoder."""
    model = model.to(device).eval()

    @torch.no_grad()
    def embed(samples: list[np.ndarray]) -> np.ndarray:
        out = []
        for batch in batches(samples):
            x = torch.from_numpy(batch[:, None]).to(device)
            final, _ = model.encode(model.preprocess(x))
            out.append(final.mean(dim=(2, 3)).cpu().numpy())
        return np.concatenate(out)

    return Embedder(label, "2d", embed)


def embedder_3d(
    net: torch.nn.Module,
    patch: tuple[int, int, int],
    label: str,
    device: torch.device,
    normalize: NormalizeConfig | None = None,
) -> Embedder:
    """Our 3D backbone's pooled embedding, each block resized to its training `patch` size."""
    net = net.to(device).eval()

    @torch.no_grad()
    def embed(samples: list[np.ndarray]) -> np.ndarray:
        out = []
        for batch in batches(samples):
            x = torch.from_numpy(batch[:, None]).to(device)
            x = F.interpolate(x, size=patch, mode="trilinear", align_corners=False)
            out.append(net.embed(x).cpu().numpy())
        return np.concatenate(out)

    return Embedder(label, "3d", embed, normalize or NormalizeConfig())


def image_files(path: str | Path) -> list[Path]:
    """A file itself; in a folder, its `image/` subfolder or its images, skipping label, mask and blurred
    files."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise InputError(p, "no such file or folder")
    folder = p / "image" if (p / "image").is_dir() else p
    files = []
    for f in natural_sorted(folder.iterdir()):
        stem, ext = split_name(f)
        low = stem.lower()
        if ext and not low.endswith(("_label", "_blurred")) and not low.startswith(("mask", "label")):
            files.append(f)
    if not files:
        raise InputError(p, f"no images found (expected {', '.join(SUFFIXES)} files or an image/ subfolder)")
    return files


def dataset_samples(
    path: str | Path,
    kind: str,
    tile: int,
    max_samples: int,
    seed: int,
    normalize: NormalizeConfig | None = None,
    planes_per_volume: int = 8,
) -> list[np.ndarray]:
    """Normalised tiles (2D) or blocks (3D) of one dataset, at most `max_samples`, chosen by `seed`.

    For 3D, 2D images give tiles repeated `tile` times along Z (a flat volume); for 2D, volumes give
    `planes_per_volume` evenly spaced Z slices.
    """
    samples: list[np.ndarray] = []
    for f in image_files(path):
        arr = np.asarray(
            percentile_normalize(read_array(f).astype(np.float32), normalize or NormalizeConfig())
        )
        if kind == "2d" and arr.ndim == 3:
            zs = np.unique(np.linspace(0, arr.shape[0] - 1, planes_per_volume).round().astype(int))
            samples += [t for z in zs for t in _tiles(arr[z], tile)]
        else:
            samples += _tiles(arr, tile)
    if len(samples) > max_samples:
        keep = np.random.default_rng(seed).choice(len(samples), max_samples, replace=False)
        samples = [samples[i] for i in sorted(keep)]
    if kind == "3d":
        samples = [s if s.ndim == 3 else np.repeat(s[None], tile, axis=0) for s in samples]
    return [np.ascontiguousarray(s) for s in samples]


def _tiles(arr: np.ndarray, tile: int) -> list[np.ndarray]:
    """Non-overlapping tiles of side `tile` along every axis (smaller axes are taken whole)."""
    grids = np.meshgrid(*[tile_starts(s, tile) for s in arr.shape], indexing="ij")
    return [
        arr[tuple(slice(int(o), int(o) + tile) for o in corner)]
        for corner in zip(*(g.ravel() for g in grids))
    ]


def linear_probe_accuracy(
    x: np.ndarray, y: np.ndarray, folds: int = 5, seed: int = 0, weight_decay: float = 1e-2
) -> float:
    """Stratified k-fold accuracy of an L2-regularised multinomial logistic regression."""
    classes, y = np.unique(y, return_inverse=True)
    k = min(folds, int(np.bincount(y).min()))
    if len(classes) < 2 or k < 2:
        raise InputError(None, "separability needs at least 2 datasets with at least 2 samples each")
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=int)
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = np.arange(len(idx)) % k
    correct = 0
    for f in range(k):
        train, test = fold != f, fold == f
        pred = _fit_predict(x[train], y[train], x[test], len(classes), weight_decay)
        correct += int((pred == y[test]).sum())
    return correct / len(y)


def _fit_predict(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int, weight_decay: float
) -> np.ndarray:
    """Softmax regression on standardised features, fitted by L-BFGS (scipy; tiny problems, no threads)."""
    from scipy.optimize import minimize
    from scipy.special import log_softmax

    mean, std = x_train.mean(0), x_train.std(0) + 1e-8
    x = np.hstack([(x_train - mean) / std, np.ones((len(x_train), 1))])
    onehot = np.eye(n_classes)[y_train]

    def loss_grad(flat: np.ndarray) -> tuple[float, np.ndarray]:
        w = flat.reshape(x.shape[1], n_classes)
        logp = log_softmax(x @ w, axis=1)
        reg = w[:-1]
        loss = -(onehot * logp).sum() / len(x) + weight_decay * (reg * reg).sum()
        grad = x.T @ (np.exp(logp) - onehot) / len(x)
        grad[:-1] += 2 * weight_decay * reg
        return float(loss), grad.ravel()

    res = minimize(
        loss_grad, np.zeros(x.shape[1] * n_classes), jac=True, method="L-BFGS-B", options={"maxiter": 500}
    )
    w = res.x.reshape(x.shape[1], n_classes)
    xt = np.hstack([(x_test - mean) / std, np.ones((len(x_test), 1))])
    return (xt @ w).argmax(1)


def pca_2d(x: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """First two principal components of `x` and their explained-variance fractions."""
    centred = x - x.mean(0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    var = s**2 / max((s**2).sum(), 1e-12)
    coords = u[:, :2] * s[:2]
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
    return coords, [float(v) for v in var[:2]]


def plot_pca(coords: np.ndarray, labels: np.ndarray, names: list[str], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=120)
    for i, name in enumerate(names):
        sel = labels == i
        ax.scatter(coords[sel, 0], coords[sel, 1], s=14, alpha=0.75, label=name)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def dataset_names(data: list[str]) -> list[str]:
    """Each path relative to the datasets' common folder (lsm_fm_samples/finetune/train, not just train)."""
    paths = [Path(d).resolve() for d in data]
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return [str(p.relative_to(root)) for p in paths]


def analyze(
    embedders: dict[str, Embedder],
    data: list[str],
    out_dir: str | Path,
    tile: int = 128,
    max_samples: int = 64,
    seed: int = 0,
) -> dict:
    """Embed each dataset with each embedder ("before", optionally "after"); write PCA plots and
    domains.json."""
    out = Path(out_dir)
    names = dataset_names(data)
    samples: dict[tuple[str, NormalizeConfig], list[list[np.ndarray]]] = {}
    report: dict = {"datasets": {}, "tile": tile, "results": {}}
    for stage, emb in embedders.items():
        key = (emb.kind, emb.normalize)
        if key not in samples:
            samples[key] = [
                dataset_samples(d, emb.kind, tile, max_samples, seed, emb.normalize) for d in data
            ]
        per_set = samples[key]
        feats = np.concatenate([emb.embed(s) for s in per_set])
        labels = np.concatenate([np.full(len(s), i) for i, s in enumerate(per_set)])
        acc = linear_probe_accuracy(feats, labels, seed=seed)
        coords, var = pca_2d(feats)
        chance = float(np.bincount(labels).max() / len(labels))
        plot_pca(
            coords,
            labels,
            names,
            f"{emb.label} ({stage}): separability {acc:.2f} (chance {chance:.2f})",
            out / f"pca_{stage}.png",
        )
        report["results"][stage] = {
            "encoder": emb.label,
            "separability": acc,
            "chance": chance,
            "explained_variance": var,
            "feature_dim": int(feats.shape[1]),
        }
        report["datasets"] = {n: len(s) for n, s in zip(names, per_set)}
    atomic_write_text(out / "domains.json", json.dumps(report, indent=2))
    return report


def make_embedders(
    encoder: str | None, size: str, adapted: str | None, device: torch.device
) -> dict[str, Embedder]:
    """ "before" (and, with a baseline2d run folder, "after") embedders.

    Args:
        encoder: `sam`, `dinov2`, `dinov3`, `clip` (random weights of `size`) or `NAME:WEIGHTS`
            (folder or hub id), or `lsmfm3d:SOURCE` (a `lsmfm.load_pretrained` source) / `lsmfm3d:scratch`.
        adapted: a `lsmfm baseline2d` run folder; "before" is its base model, "after" its adapted encoder.
    """
    from lsmfm.baselines2d.build import build_model, load_adapted
    from lsmfm.baselines2d.config import ModelConfig

    if adapted:
        model, cfg = load_adapted(Path(adapted) / "adapted")
        if encoder:
            name, _, weights = encoder.partition(":")
            if (name, weights) != (cfg.model.name, cfg.model.weights):
                raise InputError(
                    adapted,
                    f"run adapted {cfg.model.name}:{cfg.model.weights or '(random)'}, "
                    f"not --encoder {encoder}",
                )
        base = f"{cfg.model.name}:{cfg.model.weights or 'random-' + cfg.model.size}"
        return {
            "before": embedder_2d(build_model(cfg.model), base, device),
            "after": embedder_2d(model, f"{base} + {cfg.peft.method}", device),
        }
    if not encoder:
        raise InputError(None, "give --encoder, or --adapted RUN_DIR")
    name, _, weights = encoder.partition(":")
    if name == "lsmfm3d":
        return {"before": _lsmfm3d(weights or "scratch", size, device)}
    if name not in ("sam", "dinov2", "dinov3", "clip"):
        raise InputError(
            None,
            f"--encoder {encoder!r}: expected sam, dinov2, dinov3, clip (optionally :WEIGHTS) "
            "or lsmfm3d:SOURCE",
        )
    label = f"{name}:{weights or 'random-' + size}"
    return {
        "before": embedder_2d(build_model(ModelConfig(name=name, size=size, weights=weights)), label, device)
    }


def _lsmfm3d(source: str, size: str, device: torch.device) -> Embedder:
    """Our 3D backbone: `load_pretrained(source)`, or random weights ("scratch"; a tiny UNet when size is
    tiny)."""
    from lsmfm.models.backbones.registry import build_backbone, default_backbone_config
    from lsmfm.models.backbones.unet import UNetConfig

    if source == "scratch":
        torch.manual_seed(0)
        if size == "tiny":
            cfg, patch = UNetConfig(channels=[8, 16, 32], strides=[2, 2], out_channels=16), 32
        else:
            cfg, patch = default_backbone_config(), 64
        return embedder_3d(build_backbone(cfg), (patch,) * 3, f"lsmfm3d:scratch-{cfg.arch}", device)
    import lsmfm

    net = lsmfm.load_pretrained(source)
    conf = net.lsmfm_config
    return embedder_3d(net, tuple(conf.patch_size), f"lsmfm3d:{source}", device, conf.normalize)
