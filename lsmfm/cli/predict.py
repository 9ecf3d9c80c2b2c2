"""`lsmfm predict`: apply a finetuned segment or deblur model to a whole volume of any size.

    lsmfm predict --model RUN_DIR/model --input brain.ome.zarr --out brain_pred.zarr [--block 256]
                  [--overlap 0.25] [--batch 1] [--threshold 0.5] [--device auto] [--overwrite]
    torchrun --nproc-per-node N -m lsmfm.cli.main predict ...   (N ranks share the blocks)

Re-running a killed or stopped command resumes it. After SIGTERM/SIGUSR1 the run finishes its current
block and exits with status 75 (EX_TEMPFAIL: run it again to finish).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from lsmfm.cli.common import add_overwrite, add_quiet, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="finetuned model folder (model.safetensors + config.json), or a finetuning "
                             "checkpoint of the LSM foundation model paper (.ckpt)")
    parser.add_argument("--input", required=True,
                        help="volume: .zarr (OME-Zarr level 0), .tif/.tiff, .nii/.nii.gz or a folder of "
                             "TIFF planes")
    parser.add_argument("--out", required=True, help="output OME-Zarr store, e.g. PRED.zarr")
    parser.add_argument("--block", type=int, default=256,
                        help="largest block core edge in voxels; memory grows with (block + patch)^3 "
                             "(default 256)")
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1) (0.25)")
    parser.add_argument("--batch", type=int, default=1, help="windows per forward pass (1)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="segmentation mask threshold (default: the model's recorded one)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--shard", type=int, default=None,
                        help="output chunks (64³) per shard edge, capped by --block (default 4; 1: a file "
                             "per chunk)")
    parser.add_argument("--follow-symlinks", action="store_true",
                        help="read a --model folder whose files are symlinks leading outside it (refused "
                             "otherwise)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write the run summary to this JSON file")
    add_overwrite(parser, "an existing --out (and --json) when done")
    add_quiet(parser)


STOPPED = 75  # EX_TEMPFAIL: not finished, the same command resumes


def run(args: argparse.Namespace) -> int:
    import os

    from lsmfm.io.atomic import atomic_write_text
    from lsmfm.io.omezarr import SHARD_CHUNKS
    from lsmfm.tasks.predict import PredictOptions, predict_volume

    check_output(args.out, overwrite=args.overwrite, kind="store")
    check_output(args.json, overwrite=args.overwrite, kind="file")
    opts = PredictOptions(block=args.block, overlap=args.overlap, batch_size=args.batch,
                          threshold=args.threshold, device=args.device,
                          shard=SHARD_CHUNKS if args.shard is None else args.shard,
                          follow_symlinks=args.follow_symlinks)
    summary = predict_volume(args.model, args.input, args.out, opts, overwrite=args.overwrite,
                             progress=not args.quiet)
    if os.environ.get("RANK", "0") != "0":
        return STOPPED if summary["stopped"] else 0
    if summary["stopped"]:
        print(f"stopped after {summary['blocks_done']} of {summary['blocks']} blocks (signal); they are kept "
              f"in {summary['out']}.partial: run the same command again to finish (or delete it to "
              "discard them)")
        return STOPPED
    shape = "x".join(str(s) for s in summary["shape"])
    ranks = f" on {summary['ranks']} ranks" if summary["ranks"] > 1 else ""
    resumed = f", {summary['blocks_resumed']} resumed" if summary["blocks_resumed"] else ""
    print(f"{summary['task']}: {shape} voxels in {summary['blocks']} blocks{resumed}{ranks}, "
          f"{summary['seconds']:.1f} s ({summary['voxels_per_s'] / 1e6:.2f} M voxels/s per rank); "
          f"{summary['windows']} windows, {summary['windows'] / summary['windows_one_pass']:.2f}x one "
          "in-memory pass (a larger --block runs fewer, in more memory)")
    bounds = ", ".join(f"[{lo:.4g}, {hi:.4g}]" for lo, hi in summary["bounds"])
    print(f"normalisation bounds {bounds} (from the {summary['bounds_source']})")
    levels = f"{summary['levels']} levels"
    if summary["output"] == "mask":
        print(f"wrote {summary['out']}: probabilities at 0 ({levels}), mask (> {summary['threshold']}) at "
              "labels/mask")
    else:
        print(f"wrote {summary['out']}: restored image at 0 ({levels}, input intensity units)")
    if args.json:
        atomic_write_text(args.json, json.dumps(summary, indent=2) + "\n")
    return 0
