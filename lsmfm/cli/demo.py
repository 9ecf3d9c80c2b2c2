"""`lsmfm demo`: the embedded default, end to end on synthetic data, on one CPU, with no network.

It runs the same subcommands a user would, in order, so the demo doubles as a worked example:
synth -> ingest (catalog) -> stream -> pretrain -> export -> compare segment (the pretrained model, the
same network from scratch and a tiny random 2D SAM + LoRA, on the same volumes per shot; its 3D arms are
`lsmfm finetune segment`'s runs) -> predict on a whole volume with the kept pretrained model -> export
that model as a bioimage.io package (when the bioimageio extra is installed); the comparison's table
closes the output.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from lsmfm.cli.common import add_overwrite, add_quiet
from lsmfm.errors import InputError, LsmfmError

REPO = Path(__file__).resolve().parents[2]
MARKER = ".lsmfm-demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrain-steps", type=int, default=None, help="override the tiny recipe's steps")
    add_overwrite(parser, "the output of an earlier `lsmfm demo` in --out")
    add_quiet(parser)


def _stage(title: str, argv: list[str], quiet: bool = False) -> None:
    from lsmfm.cli.main import main

    if quiet:
        argv = [*argv, "--quiet"]  # after the subcommand (finetune segment, catalog ingest, ...)
    print(f"\n=== {title}\n$ lsmfm {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    rc = main(argv)
    if rc != 0:
        raise LsmfmError(f"demo stage '{title}' failed with exit code {rc}")
    print(f"--- {title}: {time.perf_counter() - start:.1f} s", flush=True)


def run(args: argparse.Namespace) -> int:
    from lsmfm.data.synthetic.write import write_demo_catalog

    out: Path = args.out
    _reset_demo_dir(out, args.overwrite)
    quiet = args.quiet
    synth, stores = out / "synth", out / "stores"
    _stage("1/8 generate synthetic light-sheet volumes",
           ["synth", "--out", str(synth), "--seed", str(args.seed)], quiet)
    catalog = write_demo_catalog(out / "catalog.yaml", synth, stores)
    _stage("2/8 ingest into OME-Zarr (catalog)", ["catalog", "ingest", str(catalog)], quiet)
    _stage("3/8 stream patches", ["stream", "--catalog", str(catalog), "--patch", "32", "--batch", "4",
                                  "--n", "25", "--seed", str(args.seed)], quiet)
    pretrain = ["pretrain", "--config", str(REPO / "pretrain" / "tiny.yaml"), "--out", str(out / "pretrain"),
                f"data.catalogs=[{catalog}]"]
    if args.pretrain_steps is not None:
        pretrain.append(f"train.max_steps={args.pretrain_steps}")
    _stage("4/8 pretrain (student-teacher, masked reconstruction + distillation + CLIP)", pretrain, quiet)
    _stage("5/8 export the teacher backbone", ["export", str(out / "pretrain"), "--out", str(out / "weights")])
    ft = synth / "finetune"
    compared = out / "compare_segment"
    _stage("6/8 few-shot segmentation: the demo's pretrained model vs scratch vs a tiny 2D SAM + LoRA, the "
           "same volumes per shot",
           ["compare", "segment", "--config", str(REPO / "finetune" / "demo_compare.yaml"),
            "--out", str(compared), f"arms.0.source={out / 'weights'}",
            f"data.train_dir={ft / 'train'}", f"data.val_dir={ft / 'val'}", f"data.test_dir={ft / 'test'}"],
           quiet)
    model = _largest_shot_model(compared / "demo_pretrained")
    _stage("7/8 whole-volume prediction with the kept pretrained model (sliding window, out of core)",
           ["predict", "--model", str(model), "--input", str(stores / "synth_01_vessels.zarr"),
            "--out", str(out / "prediction.zarr"), "--block", "64"], quiet)
    package = _bioimageio_stage(model, out / "segment.bioimageio.zip", quiet)
    print(f"\nDemo finished. Outputs under {out}/ (prediction: {out / 'prediction.zarr'}"
          + (f", bioimage.io package: {package}" if package else "")
          + f"); the comparison ({compared}/results.md, plots {compared}/*_vs_shots.png):\n")
    print((compared / "results.md").read_text())
    return 0


def _bioimageio_stage(model: Path, package: Path, quiet: bool) -> Path | None:
    """Stage 8, when `lsmfm[bioimageio]` is installed (else one line saying how to get it)."""
    import importlib.util

    title = "8/8 export the model as a bioimage.io package (deepImageJ, ilastik, napari)"
    if importlib.util.find_spec("bioimageio") is None:
        print(f"\n=== {title}\nskipped: needs pip install 'lsmfm[bioimageio]'", flush=True)
        return None
    _stage(title, ["export", "--format", "bioimageio", str(model), "--out", str(package), "--author",
                   "lsmfm demo"])
    return package


def _reset_demo_dir(out: Path, overwrite: bool = False) -> None:
    """Start from an empty folder; only a folder an earlier demo made (it holds MARKER) is ever removed,
    and only with `overwrite`."""
    if out.exists() and not out.is_dir():
        raise InputError(out, "is an existing file, not a folder; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise InputError(out, "folder exists and was not made by `lsmfm demo`; choose another --out")
        if not overwrite:
            raise InputError(out, "holds an earlier demo's output; pass --overwrite to replace it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by `lsmfm demo`; the next demo run replaces this folder\n")


def _largest_shot_model(runs: Path) -> Path:
    """The saved model of the run with the most training shots (folders are named shots<N>_seed<S>)."""
    models = sorted(runs.glob("shots*_seed*/model"), key=lambda p: int(p.parent.name[5:].split("_")[0]))
    if not models:
        raise LsmfmError(f"{runs}: no finetuned model was saved")
    return models[-1]
