"""`lsmfm analyze domains`: how far apart datasets lie in an encoder's feature space;
`lsmfm analyze retrieval`: rank text prompts (or catalog descriptions) for volumes with a paper image+text
checkpoint, zero-shot.

lsmfm analyze domains --encoder sam:facebook/sam-vit-base --data DIR_A DIR_B DIR_C --out runs/domains
lsmfm analyze domains --encoder lsmfm3d:unet_image_text --data ...
lsmfm analyze domains --adapted runs/baseline2d_sam_lora --data ...   # before and after adaptation
lsmfm analyze retrieval --model unet_image_text --images a.nii.gz b.tif --catalog data_catalog/x.yaml
lsmfm analyze retrieval --model ckpt --images a.nii.gz --prompt "nuclear stain" --prompt "vessels"
"""

from __future__ import annotations

import argparse

from lsmfm.cli.common import add_overwrite, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    p = sub.add_parser("domains", help="PCA of encoder features coloured by dataset, and their separability")
    p.add_argument(
        "--encoder",
        help="sam|dinov2|dinov3|clip[:WEIGHTS] (random weights without), "
        "or lsmfm3d:SOURCE (a load_pretrained source) or lsmfm3d:scratch",
    )
    p.add_argument("--data", nargs="+", required=True, help="two or more datasets (folders or image files)")
    p.add_argument("--adapted", help="a `lsmfm baseline2d` run folder: also report after its adaptation")
    p.add_argument(
        "--size",
        default="vit_b",
        choices=["tiny", "vit_b", "vit_l", "vit_h"],
        help="architecture of random-weight encoders (default vit_b)",
    )
    p.add_argument("--tile", type=int, default=128, help="tile side in pixels (default 128)")
    p.add_argument("--max-samples", type=int, default=64, help="tiles per dataset (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default="runs/domains", help="output folder (default runs/domains)")
    add_overwrite(p, "a non-empty --out")


    r = sub.add_parser("retrieval", help="rank prompts or catalog descriptions for volumes (paper image+text "
                                         "checkpoints): zero-shot classification and retrieval")
    r.add_argument("--model", required=True, help="a paper image+text .ckpt or release name (unet_image_text)")
    r.add_argument("--images", nargs="+", required=True, help="volumes (.nii.gz, .tif, .zarr, ...)")
    r.add_argument("--prompt", action="append", default=[], help="a class prompt (repeat for more)")
    r.add_argument("--catalog", help="a catalog YAML: each entry is a class, its descriptions its prompts")
    r.add_argument("--which", default="student", choices=["student", "teacher", "auto"],
                   help="image encoder (default student: the projection was trained on it)")
    r.add_argument("--text-model", default=None,
                   help="BERT config and tokenizer (Hub id or folder; default: the checkpoint's, bert-base-uncased)")
    r.add_argument("--out", default=None, help="also write retrieval.json here (a file path)")
    add_overwrite(r, "--out")


def run(args: argparse.Namespace) -> int:
    if args.analysis == "retrieval":
        return run_retrieval(args)
    from lsmfm.baselines2d.domains import analyze, make_embedders
    from lsmfm.device import resolve_device
    from lsmfm.errors import InputError

    if len(args.data) < 2:
        raise InputError(None, "--data needs at least two datasets")
    if args.tile < 8 or args.max_samples < 2:
        raise InputError(None, "--tile must be >= 8 and --max-samples >= 2")
    check_output(args.out, overwrite=args.overwrite, kind="folder")
    embedders = make_embedders(args.encoder, args.size, args.adapted, resolve_device(args.device))
    report = analyze(
        embedders, args.data, args.out, tile=args.tile, max_samples=args.max_samples, seed=args.seed
    )
    print("datasets: " + ", ".join(f"{n} ({k} tiles)" for n, k in report["datasets"].items()))
    for stage, r in report["results"].items():
        print(
            f"{stage:6s} {r['encoder']}: separability {r['separability']:.3f} (chance {r['chance']:.3f}), "
            f"PCA variance {r['explained_variance'][0]:.2f} + {r['explained_variance'][1]:.2f}"
        )
    print(f"wrote {args.out}/domains.json and pca_*.png")
    return 0


def run_retrieval(args: argparse.Namespace) -> int:
    import json

    from lsmfm.errors import InputError
    from lsmfm.io.atomic import atomic_write_text
    from lsmfm.weights.paper_text import load_image_text, rank

    classes = {p: [p] for p in args.prompt}
    if args.catalog:
        from lsmfm.data.catalog.entries import load_catalog

        classes |= {str(e.id): list(e.descriptions) for e in load_catalog(args.catalog)}
    if len(classes) < 2:
        raise InputError(None, "give at least two classes: --prompt TEXT (repeat) and/or --catalog YAML")
    check_output(args.out, overwrite=args.overwrite, kind="file")
    report = rank(load_image_text(args.model, args.which, args.text_model), args.images, classes)
    for image, ranked in report["images"].items():
        best = ", ".join(f"{r['class']} {r['probability']:.2f}" for r in ranked[:3])
        print(f"{image}: {best}")
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0
