"""CLI conventions: --version and the description, exit codes (1 data/user error, 2 usage), one line for
every user error and a marked traceback for bugs, --overwrite/--quiet on every command that writes or
shows progress, read-only outputs refused in one line, progress as plain lines off a terminal."""
from __future__ import annotations

import argparse
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lsmfm.cli import common
from lsmfm.cli.main import COMMANDS, build_parser, main
from lsmfm.errors import InputError

REPO = Path(__file__).resolve().parents[1]
# Every leaf command: (writes files, shows progress). A new command must be added here.
CONVENTIONS = {
    ("synth",): (True, True), ("ingest",): (True, True), ("catalog", "validate"): (False, True),
    ("catalog", "ingest"): (True, True), ("catalog", "import-paper"): (True, True), ("stream",): (True, True),
    ("pretrain",): (True, True), ("export",): (True, False), ("finetune", "segment"): (True, True),
    ("finetune", "classify"): (True, True), ("finetune", "deblur"): (True, True), ("predict",): (True, True),
    ("baseline2d",): (True, True), ("analyze", "domains"): (True, False),
    ("analyze", "retrieval"): (True, False), ("demo",): (True, True),
    ("compare", "segment"): (True, True), ("compare", "classify"): (True, True),
    ("compare", "deblur"): (True, True),
}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def leaf_parsers() -> dict[tuple[str, ...], argparse.ArgumentParser]:
    leaves = {}
    for name in COMMANDS:
        top = _subparsers(build_parser([name]))[name]
        subs = _subparsers(top)
        leaves.update({(name, s): p for s, p in subs.items()} if subs else {(name,): top})
    return leaves


def test_every_command_follows_the_output_conventions():
    leaves = leaf_parsers()
    assert set(leaves) == set(CONVENTIONS), "add new commands to CONVENTIONS"
    for cmd, parser in leaves.items():
        options = {o for a in parser._actions for o in a.option_strings}
        writes, progress = CONVENTIONS[cmd]
        assert ("--overwrite" in options) == writes, cmd
        assert ("--quiet" in options) == progress, cmd


def test_version_and_description():
    done = subprocess.run([sys.executable, "-m", "lsmfm.cli.main", "--version"], capture_output=True,
                          text=True, timeout=120)
    from lsmfm import __version__

    assert done.returncode == 0 and done.stdout.startswith(f"lsmfm {__version__}")
    text = build_parser([]).format_help()
    assert "light-sheet" in text and "bioimage.io" in text and "Exit status" in text


def test_usage_errors_exit_2_and_user_errors_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["ingest", "--no-such-option"])
    assert exc.value.code == 2
    assert main([]) == 2
    capsys.readouterr()
    assert main(["ingest", str(tmp_path / "missing.tif"), "--out", str(tmp_path / "x.zarr")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.tif" in err and "Traceback" not in err


def test_os_errors_from_the_environment_are_one_line():
    args = argparse.Namespace(out=Path("/data/out.zarr"))
    message = common.user_error_message(PermissionError(errno.EACCES, "Permission denied", "/data/x"), args)
    assert message == "/data/x: permission denied"
    assert common.user_error_message(OSError(errno.ENOSPC, "No space left on device"), args) == \
        "/data/out.zarr: no space left on device"
    assert common.user_error_message(RuntimeError("safetensors: No space left on device (os error 28)"),
                                     args) == "/data/out.zarr: no space left on device"
    quota = RuntimeError("Error while serializing: I/O error: Disk quota exceeded (os error 122)")
    assert common.user_error_message(quota, args) == "/data/out.zarr: disk quota exceeded"
    assert common.user_error_message(RuntimeError("I/O error: not found (os error 2)"), args) is None
    assert common.user_error_message(OSError(errno.EROFS, "Read-only file system", "/ro/a"), None) == \
        "/ro/a: read-only file system"
    assert common.user_error_message(KeyError("x"), args) is None  # a bug, not a user error


def test_a_bug_prints_a_traceback_and_where_to_report_it(capsys):
    def broken(args):
        return {}["missing"]

    assert common.run_command("predict", broken, argparse.Namespace()) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err
    assert "internal error: this is a bug in lsmfm" in err.splitlines()[-1] and "report it at" in err

    def user_error(args):
        raise InputError("/data/v.tif", "truncated TIFF")

    assert common.run_command("predict", user_error, argparse.Namespace()) == 1
    assert capsys.readouterr().err == "lsmfm predict: error: /data/v.tif: truncated TIFF\n"


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    assert common.run_command("ingest", interrupted, argparse.Namespace()) == 130
    assert capsys.readouterr().err == "lsmfm ingest: interrupted\n"


def test_pretrain_out_naming_a_regular_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    recipe = str(REPO / "pretrain" / "tiny.yaml")
    assert main(["pretrain", "--config", recipe, "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert err == f"lsmfm pretrain: error: {tmp_path / 'run'}: is an existing file, not a folder; choose " \
                  "another path\n"


def test_existing_outputs_are_refused_without_overwrite(tmp_path, capsys):
    out = tmp_path / "synth"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    argv = ["synth", "--out", str(out), "--size", "16", "--patch", "16", "--volumes", "1", "--per-class",
            "1", "0", "0", "--quiet"]
    assert main(argv) == 1
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0 and (out / "mine.txt").read_text() == "keep"


# ---- read-only output folders: one line for every command -------------------------------------

READ_ONLY_SCRIPT = r"""
import contextlib, io, json, sys
from lsmfm.cli.main import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    results.append({"argv": argv, "rc": rc, "err": err.getvalue()})
print(json.dumps(results))
"""


def _without_root_overrides() -> None:
    """preexec_fn: drop root's permission overrides (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER)
    from the bounding set, so folder modes apply to the child as to any user."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _as_plain_user() -> dict:
    if os.geteuid() != 0:
        return {}
    probe = subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_without_root_overrides,
                           capture_output=True)
    if probe.returncode != 0:
        pytest.skip("running as root without CAP_SETPCAP: folder permissions cannot be made to apply")
    return {"preexec_fn": _without_root_overrides}


def _tiff(path: Path) -> Path:
    import numpy as np
    import tifffile

    tifffile.imwrite(path, (np.arange(16 ** 3) % 251).astype(np.uint16).reshape(16, 16, 16))
    return path


def test_read_only_output_folders_give_one_line_for_every_command(tmp_path):
    base = tmp_path
    try:
        src = _tiff(base / "vol.tif")
        catalog = base / "catalog.yaml"
        ro = base / "ro"
        ro.mkdir()
        entry = {"id": "v", "source": str(src), "store": str(ro / "v.zarr"), "descriptions": ["a volume"]}
        catalog.write_text(json.dumps({"entries": [entry]}))
        ro.chmod(0o555)
        cases = [
            ["synth", "--out", f"{ro}/synth"],
            ["ingest", str(src), "--out", f"{ro}/v.zarr"],
            ["catalog", "ingest", str(catalog)],  # no up-front check: the store's PermissionError itself
            ["catalog", "import-paper", str(base), "--prompts", str(src), "--stores", f"{ro}/stores",
             "--out", f"{ro}/c.yaml"],
            ["stream", "--catalog", str(catalog), "--json", f"{ro}/report.json"],
            ["pretrain", "--config", str(REPO / "pretrain" / "tiny.yaml"), "--out", f"{ro}/run"],
            ["export", str(base), "--out", f"{ro}/weights"],
            ["finetune", "segment", "--out", f"{ro}/ft"],
            ["compare", "segment", "--out", f"{ro}/cmp"],
            ["predict", "--model", str(base), "--input", str(src), "--out", f"{ro}/p.zarr"],
            ["baseline2d", "--config", str(REPO / "finetune" / "baseline2d_sam_lora.yaml"), "--out",
             f"{ro}/b2d"],
            ["analyze", "domains", "--data", str(src), str(src), "--out", f"{ro}/domains"],
            ["demo", "--out", f"{ro}/demo"],
        ]
        done = subprocess.run([sys.executable, "-c", READ_ONLY_SCRIPT, json.dumps(cases)],
                              capture_output=True, text=True, timeout=600, cwd=base,
                              env={**os.environ, "HOME": str(base)}, **_as_plain_user())
        assert done.returncode == 0, done.stderr[-3000:]
        for r in json.loads(done.stdout):
            assert r["rc"] == 1, r
            assert r["err"].count("\n") == 1 and "Traceback" not in r["err"], r
            assert str(ro) in r["err"] and ("permission denied" in r["err"] or "cannot write" in r["err"]), r
        assert sorted(p.name for p in ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


# ---- progress off a terminal -----------------------------------------------------------------------

def test_progress_is_plain_lines_off_a_terminal(capsys, monkeypatch):
    from lsmfm.progress import progress_bar

    monkeypatch.setenv("LSMFM_PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("LSMFM_PROGRESS", raising=False)
    for _ in progress_bar(range(3), desc="predict", unit="block"):
        pass
    err = capsys.readouterr().err
    assert "\r" not in err and err.splitlines() == [
        line for line in err.splitlines() if line.startswith("predict: ")]
    assert err.splitlines()[-1].startswith("predict: 3/3 (100%)")
    for _ in progress_bar(range(3), desc="predict", enabled=False):
        pass
    assert capsys.readouterr().err == ""


def test_cli_progress_in_a_batch_log_and_quiet(tmp_path):
    env = {**os.environ, "LSMFM_PROGRESS_INTERVAL": "0"}
    env.pop("LSMFM_PROGRESS", None)
    argv = [sys.executable, "-m", "lsmfm.cli.main", "synth", "--size", "16", "--patch", "16",
            "--volumes", "2", "--per-class", "1", "0", "0"]
    done = subprocess.run([*argv, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "volumes: 2/2 (100%)" in done.stderr
    quiet = subprocess.run([*argv, "--out", str(tmp_path / "b"), "--quiet"], capture_output=True, text=True,
                           env=env, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == ""


def _full_device() -> bool:
    import stat

    return Path("/dev/full").exists() and stat.S_ISCHR(Path("/dev/full").stat().st_mode)


@pytest.mark.skipif(not _full_device(), reason="needs the /dev/full device (Linux): a real full-disk write")
def test_writes_cut_short_without_an_errno_are_one_line_naming_the_output(tmp_path):
    """torch.save and numpy report a write into a full device without an errno ("unexpected pos",
    "N requested and M written"): the real errors, from /dev/full, still read as a full disk."""
    import numpy as np
    import torch

    args = argparse.Namespace(out=tmp_path / "run")
    for write in (lambda: torch.save({"w": torch.zeros(10_000)}, "/dev/full"),
                  lambda: np.zeros(100_000).tofile("/dev/full")):
        with pytest.raises(Exception) as raised:
            write()
        message = common.user_error_message(raised.value, args)
        expected = "cannot write: a write was cut short (a full disk, a quota or a file-size limit; "
        assert message is not None and message.startswith(f"{tmp_path / 'run'}: {expected}")
        assert "GiB free on its device" in message
    assert common.user_error_message(RuntimeError("unexpected result"), args) is None  # still a bug
