"""Catalogs: loading rules, validation table, materialising stores, the paper importer, shipped catalogs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lsmfm.cli.main import main
from lsmfm.data.catalog.entries import load_catalog, validate_catalog, write_catalog
from lsmfm.data.catalog.materialize import ingest_catalog
from lsmfm.data.catalog.paper import import_paper, stain_from_text
from lsmfm.data.synthetic.volume import STRUCTURES
from lsmfm.data.synthetic.write import write_demo_catalog, write_nifti, write_synth_dataset
from lsmfm.errors import ConfigError, InputError
from lsmfm.io.omezarr import open_image

REPO = Path(__file__).resolve().parents[1]
PAPER = Path("lsm_fm_samples") / "pretrain"


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_load_merges_defaults_and_resolves_paths(tmp_path):
    cat = _write(tmp_path / "c.yaml", """
defaults: {licence: MIT, organism: mouse}
entries:
  - id: a
    store: stores/a.zarr
    source: raw/a.tif
    descriptions: one text
  - id: b
    store: /abs/b
    descriptions: [x, y]
    organism: rat
    weight: 2
""")
    a, b = load_catalog(cat)
    assert a.store_path == tmp_path / "stores" / "a.zarr" and a.source_paths == [tmp_path / "raw" / "a.tif"]
    assert a.descriptions == ["one text"] and a.licence == "MIT" and a.organism == "mouse"
    assert b.store_path == Path("/abs/b") and b.is_collection and b.organism == "rat" and b.weight == 2.0
    assert not a.is_collection


@pytest.mark.parametrize("body, fragment", [
    ("entries:\n  - {id: a, store: s.zarr, descriptions: [t], stains: x}\n",
     r"entry 'a': unknown key\(s\) \['stains'\]"),
    ("entries:\n  - {id: a, store: s.zarr, descriptions: [t]}\n"
     "  - {id: a, store: t.zarr, descriptions: [t]}\n", "duplicate entry id 'a'"),
    ("entries:\n  - {id: a, store: s.zarr}\n", r"entry 'a': missing required key\(s\) \['descriptions'\]"),
    ("entries:\n  - {id: a, store: s.zarr, descriptions: []}\n", "at least one non-empty text"),
    ("entries:\n  - {id: a, store: s.zarr, descriptions: [t], weight: fast}\n", "weight must be a number"),
    ("sources: []\nentries:\n  - {id: a, store: s.zarr, descriptions: [t]}\n", "unknown top-level key"),
    ("entries: []\n", "non-empty `entries:`"),
])
def test_bad_catalogs_name_file_entry_and_key(tmp_path, body, fragment):
    cat = _write(tmp_path / "bad.yaml", body)
    with pytest.raises(ConfigError, match=fragment) as err:
        load_catalog(cat)
    assert "bad.yaml" in str(err.value)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Synthetic sources and their demo catalog (stores not yet ingested)."""
    root = tmp_path_factory.mktemp("demo")
    write_synth_dataset(root / "synth", size=32, volumes=3, patch=16, n_per_class={"train": 0},
                        progress=False)
    return write_demo_catalog(root / "catalog.yaml", root / "synth", root / "stores")


def test_demo_catalog_ingest_then_validates(demo, capsys):
    assert main(["catalog", "validate", str(demo)]) == 1
    assert "store is missing" in capsys.readouterr().out
    assert main(["catalog", "ingest", str(demo), "--quiet"]) == 0
    assert main(["catalog", "validate", str(demo)]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 entries ok" in out and "32x32x32" in out and "4x1.8x1.8" in out
    entry = load_catalog(demo)[1]
    group, _ = open_image(entry.images()[0])
    assert sorted(group["labels"].attrs["ome"]["labels"]) == sorted(STRUCTURES)
    assert entry.class_label == "vessels" and len(entry.descriptions) >= 2
    assert [r["kept"] for r in ingest_catalog(demo, progress=False)] == [1, 1, 1], "complete stores are kept"


def test_validate_reports_voxel_mismatch_and_bad_channel(demo, tmp_path):
    ingest_catalog(demo, progress=False)
    store = load_catalog(demo)[0].store_path
    cat = write_catalog(tmp_path / "c.yaml", [
        {"id": "vox", "store": str(store), "voxel_size": [1.0, 1.0, 1.0], "descriptions": ["t"]},
        {"id": "chan", "store": str(store), "channel": 2, "descriptions": ["t"]},
        {"id": "lab", "store": str(store), "labels": "axons", "descriptions": ["t"]},
    ])
    status = {r["id"]: r["status"] for r in validate_catalog(cat)}
    assert "differs from the catalog's" in status["vox"]
    assert "asks for channel 2" in status["chan"]
    assert "labels/axons" in status["lab"]


def test_catalog_ingest_checks_every_source_before_writing(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", np.arange(8 ** 3, dtype=np.uint16).reshape(8, 8, 8), (1, 1, 1))
    cat = write_catalog(tmp_path / "c.yaml", [
        {"id": "a", "store": "stores/a.zarr", "source": "a.nii.gz", "descriptions": ["t"]},
        {"id": "b", "store": "stores/b.zarr", "source": "missing.tif", "descriptions": ["t"]},
    ])
    with pytest.raises(InputError, match=r"missing\.tif: catalog entry 'b': source does not exist"):
        ingest_catalog(cat, progress=False)
    assert not (tmp_path / "stores").exists()


def _paper_layout(root: Path, prompts: dict[str, str], n_patches: int = 2) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    for folder in prompts:
        for i in range(n_patches):
            (root / "patches" / folder / "input").mkdir(parents=True, exist_ok=True)
            write_nifti(root / "patches" / folder / "input" / f"{folder.lower()}_p{i}.nii.gz",
                        rng.integers(0, 500, (16, 16, 16)).astype(np.uint16), (2.0, 1.8, 1.8))
    (root / "prompts.json").write_text(json.dumps({k.lower() if i % 2 else k: v
                                                   for i, (k, v) in enumerate(prompts.items())}))
    return root / "patches", root / "prompts.json"


def test_import_paper_layout_ingests_collections(tmp_path):
    prompts = {"01_AB-Cd": "Cleared adult mouse brain stained for GFAP in the 639 nm channel.",
               "02_Xy": "Nuclei labelled with SYTO 24 (488 nm) in a cleared mouse brain."}
    root, js = _paper_layout(tmp_path, {k: v for k, v in prompts.items()})
    cat = import_paper(root, js, tmp_path / "stores", tmp_path / "paper.yaml", progress=False)
    a, b = load_catalog(cat)
    assert (a.id, a.stain, a.organism) == ("01_AB-Cd", "GFAP (639 nm)", "mouse")
    assert a.voxel_size == [2.0, 1.8, 1.8]
    assert b.descriptions == [prompts["02_Xy"]] and b.stain == "SYTO 24 (488 nm)"
    assert [p.name for p in a.images()] == ["01_ab-cd_p0.zarr", "01_ab-cd_p1.zarr"]
    assert [r["status"] for r in validate_catalog(cat)] == ["ok", "ok"]
    next(iter((tmp_path / "stores" / "02_Xy").glob("*.zarr"))).rename(tmp_path / "gone.zarr")
    assert "incomplete collection: 1 of 2" in validate_catalog(cat)[1]["status"]


def test_import_paper_requires_a_prompt_per_folder(tmp_path):
    root, js = _paper_layout(tmp_path, {"01_a": "text", "02_b": "text"}, n_patches=1)
    js.write_text(json.dumps({"01_a": "text"}))
    with pytest.raises(InputError, match="02_b: no text prompt"):
        import_paper(root, js, tmp_path / "stores", tmp_path / "paper.yaml", progress=False)
    assert not (tmp_path / "stores").exists() and not (tmp_path / "paper.yaml").exists()


def test_stain_from_text():
    assert stain_from_text("immunostained for tyrosine hydroxylase (TH), 639 nm channel") == "TH (639 nm)"
    assert stain_from_text("AAV.PHP.eB-tdTomato labelling of GPR85 neurons, 561 nm") == "tdTomato (561 nm)"
    assert stain_from_text("no known marker") == ""


def test_shipped_synthetic_catalog_matches_the_generator(tmp_path):
    shipped = REPO / "data_catalog" / "synthetic_demo.yaml"
    demo = REPO / "runs" / "demo"
    fresh = write_demo_catalog(tmp_path / "x.yaml", demo / "synth", demo / "stores")
    ours, theirs = load_catalog(shipped), load_catalog(fresh)
    assert [(e.id, e.store_path, e.source_paths, e.descriptions) for e in ours] == \
           [(e.id, e.store_path, e.source_paths, e.descriptions) for e in theirs]


@pytest.mark.shared
def test_shipped_paper_catalog_matches_the_importer(shared_data, tmp_path):
    shipped = load_catalog(REPO / "data_catalog" / "lsm_fm_pretrain_samples.yaml")
    paper = shared_data / PAPER
    fresh = load_catalog(import_paper(paper / "wu_brain_patches", paper / "text_prompts_wu.json",
                                      REPO / "runs" / "stores" / "lsm_fm_pretrain", tmp_path / "p.yaml",
                                      ingest=False))
    assert len(shipped) == 10
    assert [(e.id, e.store_path, e.source_paths, e.descriptions, e.stain) for e in shipped] == \
           [(e.id, e.store_path, e.source_paths, e.descriptions, e.stain) for e in fresh]
    assert all(e.licence == "MIT" and "2605.26026" in e.citation and e.organism == "mouse" for e in shipped)


@pytest.mark.shared
def test_real_paper_patches_import_and_validate(shared_data, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    folders = sorted((shared_data / PAPER / "wu_brain_patches").iterdir())[:3]
    for folder in folders:
        (root / folder.name).symlink_to(folder)
    prompts = shared_data / PAPER / "text_prompts_wu.json"
    assert main(["catalog", "import-paper", str(root), "--prompts", str(prompts), "--stores",
                 str(tmp_path / "stores"), "--out", str(tmp_path / "real.yaml"), "--quiet"]) == 0
    rows = validate_catalog(tmp_path / "real.yaml")
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert all(r["shape"] == "96x96x96" and r["voxel_size"].startswith("2x1.8") for r in rows)


def _user_things(root: Path) -> dict[str, Path]:
    """What a user may already have where a catalog points: a plain Zarr array and a folder of files."""
    import zarr

    array = zarr.create_array(str(root / "stores" / "array.zarr"), shape=(4, 4), dtype="u2")
    array[:] = 7
    folder = root / "stores" / "notes.zarr"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    collection = root / "stores" / "coll"
    (collection / "a.zarr").mkdir(parents=True)
    (collection / "a.zarr" / "keep.txt").write_text("mine too")
    return {"array": root / "stores" / "array.zarr", "folder": folder, "collection": collection}


@pytest.mark.parametrize("which", ["array", "folder", "collection"])
def test_catalog_ingest_never_replaces_what_lsmfm_did_not_write(tmp_path, which, capsys):
    (tmp_path / "src").mkdir()
    write_nifti(tmp_path / "src" / "a.nii.gz", np.arange(16 ** 3, dtype=np.uint16).reshape(16, 16, 16), (1, 1, 1))
    things = _user_things(tmp_path)
    source = "src" if which == "collection" else "src/a.nii.gz"
    cat = write_catalog(tmp_path / "c.yaml", [{"id": "e", "store": str(things[which].relative_to(tmp_path)),
                                               "source": source, "descriptions": ["t"]}])
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["catalog", "ingest", str(cat), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "exists and was not written by lsmfm" in err and len(err.strip().splitlines()) == 1
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing touched
    assert main(["catalog", "ingest", str(cat), "--quiet", "--overwrite"]) == 0  # asked for: replaced
    image = things[which] / "a.zarr" if which == "collection" else things[which]
    group, _ = open_image(image)
    assert group["0"].shape == (1, 16, 16, 16)


def test_catalog_ingest_removes_only_lsmfm_leftovers(tmp_path):
    from lsmfm.io.lock import mark_partial

    write_nifti(tmp_path / "a.nii.gz", np.arange(16 ** 3, dtype=np.uint16).reshape(16, 16, 16), (1, 1, 1))
    cat = write_catalog(tmp_path / "c.yaml", [{"id": "a", "store": "a.zarr", "source": "a.nii.gz",
                                               "descriptions": ["t"]}])
    leftover = tmp_path / "a.zarr.partial"
    leftover.mkdir()
    (leftover / "user.txt").write_text("not lsmfm's")
    with pytest.raises(InputError, match="a.zarr.partial: exists and was not written by lsmfm"):
        ingest_catalog(cat, progress=False)
    assert (leftover / "user.txt").read_text() == "not lsmfm's"
    (leftover / "user.txt").unlink()
    mark_partial(leftover)  # a killed ingest's own leftover
    (leftover / "0").mkdir()
    assert ingest_catalog(cat, progress=False)[0]["written"] == 1
    assert not leftover.exists() and (tmp_path / "a.zarr" / "0").is_dir()


def test_validate_deep_lists_lost_and_corrupt_chunks_by_path(tmp_path, capsys):
    from lsmfm.data.ingest.convert import ingest_array

    rng = np.random.default_rng(0)
    vol = rng.integers(0, 1000, (40, 40, 40)).astype(np.uint16)
    vol[:16, :16, :16] = 0  # an all-zero chunk: stored like any other, never mistaken for a lost one
    image = ingest_array(vol, (1, 1, 1), tmp_path / "img.zarr", labels={"m": (vol > 500).astype(np.uint8)},
                         chunk=16, shard=2, progress=False)
    plain = ingest_array(vol, (1, 1, 1), tmp_path / "plain.zarr", chunk=16, shard=1, progress=False)
    cat = write_catalog(tmp_path / "c.yaml", [
        {"id": "img", "store": "img.zarr", "descriptions": ["t"], "labels": "m"},
        {"id": "plain", "store": "plain.zarr", "descriptions": ["t"]}])
    assert main(["catalog", "validate", str(cat), "--deep", "--quiet"]) == 0
    assert "2 of 2 entries ok" in capsys.readouterr().out
    lost = image / "labels/m/0/c/0/1/0/0"
    lost.unlink()
    bad = plain / "0/c/0/1/1/1"
    bad.write_bytes(b"\x01" * len(bad.read_bytes()))
    shard = image / "0/c/0/0/0/0"
    raw = bytearray(shard.read_bytes())
    raw[5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert main(["catalog", "validate", str(cat)]) == 0  # the metadata alone looks fine
    capsys.readouterr()
    assert main(["catalog", "validate", str(cat), "--deep", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert f"  {lost}: missing shard: every chunk of this array was written" in out
    assert f"  {shard} (inner chunk (0, 0, 0, 0)): corrupt chunk: cannot decompress" in out
    assert f"  {bad}: corrupt chunk: cannot decompress" in out
    assert "img: " in out and "2 lost or corrupt chunk(s)" in out and "0 of 2 entries ok" in out
