"""`lsmfm catalog validate|ingest|import-paper`: check, materialise or create dataset catalogs."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

from lsmfm.cli.common import add_overwrite, add_quiet, check_output


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = sub.add_parser("validate", help="check every entry and print a table (exit 1 if any is bad)")
    p.add_argument("catalog", type=Path)
    p.add_argument("--deep", action="store_true",
                   help="also read every chunk: list lost and corrupt chunks by path (reads all the data)")
    add_quiet(p)
    p = sub.add_parser("ingest", help="ingest the missing stores of a catalog from their sources")
    p.add_argument("catalog", type=Path)
    add_overwrite(p, "stores that already exist (re-ingest them)")
    p.add_argument("--shard", type=int, default=4, help="chunks per shard side (default 4; 1: a file per chunk)")
    add_quiet(p)
    p = sub.add_parser("import-paper", help="catalog the LSM foundation model paper's patches + prompts")
    p.add_argument("root", type=Path, help="folder of <volume>/input/*.nii.gz")
    p.add_argument("--prompts", type=Path, required=True, help="JSON: volume folder name -> text prompt")
    p.add_argument("--stores", type=Path, required=True, help="folder for the per-volume collection stores")
    p.add_argument("--out", type=Path, required=True, help="catalog YAML to write")
    p.add_argument("--no-ingest", action="store_true", help="only write the catalog (ingest later)")
    p.add_argument("--licence", default="MIT")
    p.add_argument("--citation", default=None, help="default: the paper")
    add_overwrite(p, "an existing --out catalog")
    add_quiet(p)


def format_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    cells = [list(columns)] + [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells)


def run(args: argparse.Namespace) -> int:
    return {"validate": _validate, "ingest": _ingest, "import-paper": _import}[args.action](args)


def _validate(args: argparse.Namespace) -> int:
    from lsmfm.data.catalog.entries import validate_catalog

    rows = validate_catalog(args.catalog, deep=args.deep, progress=args.deep and not args.quiet)
    bad = [r for r in rows if r["status"] != "ok"]
    table = [{**r, "status": "ok" if r["status"] == "ok" else "BAD"} for r in rows]
    columns = ["id", "images", "shape", "voxel_size", "descriptions"] + (["chunks"] if args.deep else [])
    print(format_rows(table, columns + ["status"]))
    for r in bad:
        print(f"{r['id']}: {r['status']}")
        for problem in r.get("problems", []):
            print(f"  {problem}")
    summary = f"{len(rows) - len(bad)} of {len(rows)} entries ok"
    print(summary + (f"; {len(bad)} need attention" if bad else ""))
    return 1 if bad else 0


def _ingest(args: argparse.Namespace) -> int:
    from lsmfm.data.catalog.materialize import ingest_catalog

    rows = ingest_catalog(args.catalog, overwrite=args.overwrite, progress=not args.quiet, shard=args.shard)
    print(format_rows(rows, ["id", "written", "kept", "store"]))
    return 0


def _import(args: argparse.Namespace) -> int:
    from lsmfm.data.catalog.entries import load_catalog
    from lsmfm.data.catalog.paper import PAPER_CITATION, import_paper

    check_output(args.out, overwrite=args.overwrite, kind="file")
    check_output(args.stores, overwrite=True, kind="folder")
    out = import_paper(args.root, args.prompts, args.stores, args.out, ingest=not args.no_ingest,
                       licence=args.licence, citation=args.citation or PAPER_CITATION,
                       progress=not args.quiet)
    print(f"wrote {out} with {len(load_catalog(out))} entries"
          + ("" if args.no_ingest else f"; stores under {args.stores}"))
    return 0
