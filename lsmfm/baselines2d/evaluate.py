"""Score a 2D baseline on whole cases: slice predictions stacked back to 3D for volumes, then Dice, clDice,
IoU (lsmfm.metrics.segmentation, as in finetuning) and the instance accuracy over IoU thresholds 0.5:0.95."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lsmfm.baselines2d.data import Case
from lsmfm.metrics.instances import mean_segmentation_accuracy
from lsmfm.baselines2d.models.base import Segmenter2D
from lsmfm.metrics.segmentation import cldice_score, dice_score, iou_score

METRICS = ("dice", "cldice", "iou", "seg_accuracy")


@torch.no_grad()
def predict_case(
    model: Segmenter2D, case: Case, device: torch.device, batch_size: int, threshold: float
) -> np.ndarray:
    """Foreground mask (Z, H, W) of one case, predicted slice by slice."""
    model.eval()
    out = []
    for z in range(0, case.image.shape[0], batch_size):
        x = torch.from_numpy(np.ascontiguousarray(case.image[z : z + batch_size, None])).to(device)
        out.append((torch.sigmoid(model.logits(x)) > threshold)[:, 0].cpu().numpy())
    return np.concatenate(out)


def score_case(pred: np.ndarray, case: Case, metrics: tuple[str, ...] = METRICS) -> dict[str, float]:
    """`metrics` of one case; 2D cases are scored as 2D images, volumes in 3D."""
    target = case.label if case.is_3d else case.label[0]
    mask = pred if case.is_3d else pred[0]
    fg = target > 0
    functions = {"dice": lambda: dice_score(mask, fg), "cldice": lambda: cldice_score(mask, fg),
                 "iou": lambda: iou_score(mask, fg),
                 "seg_accuracy": lambda: mean_segmentation_accuracy(mask, target)}
    return {m: functions[m]() for m in metrics}


def evaluate(
    model: Segmenter2D,
    cases: list[Case],
    device: torch.device,
    batch_size: int,
    threshold: float,
    pred_dir: Path | None = None,
) -> dict[str, float]:
    """Mean of each metric over `cases`; the masks are written as uint8 TIFFs to `pred_dir` when given."""
    scores = []
    for case in cases:
        pred = predict_case(model, case, device, batch_size, threshold)
        scores.append(score_case(pred, case))
        if pred_dir is not None:
            write_mask(pred if case.is_3d else pred[0], pred_dir / f"{case.name}.tif")
    return {m: float(np.mean([s[m] for s in scores])) for m in METRICS}


def write_mask(mask: np.ndarray, path: Path) -> None:
    """uint8 TIFF, 255 = foreground (written inside the run's temporary folder, renamed as a whole)."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, mask.astype(np.uint8) * 255)
