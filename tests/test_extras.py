"""Optional dependencies: `pip install lsmfm` stays light, every extra lsmfm names exists in pyproject.toml
and installs what it is named for, and a missing one is a one-line error naming it."""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

import pytest

from lsmfm.extras import EXTRAS, MissingExtra, require

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
HEAVY = {"deepspeed", "tensorboard", "transformers", "peft", "bitsandbytes", "distributed", "bioimageio.core",
         "bioimageio.spec", "dask-jobqueue"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=\[; ]", requirement, maxsplit=1)[0].lower()


def require_calls() -> list[tuple[str, str, str]]:
    """(file, module, extra) of every `require("module", "extra", ...)` in lsmfm/."""
    calls = []
    for path in (REPO / "lsmfm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and \
                    len(node.args) >= 2 and all(isinstance(a, ast.Constant) for a in node.args[:2]):
                calls.append((path.name, node.args[0].value, node.args[1].value))
    return calls


def test_the_plain_install_has_no_heavy_dependency():
    base = {_name(r) for r in PYPROJECT["dependencies"]}
    assert not base & HEAVY
    assert {"torch", "monai", "zarr", "dask", "tifffile", "nibabel", "safetensors", "tqdm", "matplotlib"} <= base


def test_every_extra_named_in_code_installs_that_package():
    extras = PYPROJECT["optional-dependencies"]
    assert set(EXTRAS) == set(extras) - {"test"}
    calls = require_calls()
    assert {m.split(".")[0] for _, m, _ in calls} >= {"deepspeed", "tensorboard", "transformers", "peft",
                                                       "bioimageio", "bitsandbytes", "distributed"}
    for where, module, extra in calls:
        names = {_name(r) for r in extras[extra]}
        top = module.split(".")[0]
        assert any(n == top or n.startswith(top + ".") for n in names), (where, module, extra)
    everything = {_name(r) for r in extras["all"]}
    assert everything == {"lsmfm"} and "qlora" not in extras["all"][0]


def test_a_missing_package_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(MissingExtra) as info:
        require("peft", "baselines", "the LoRA baselines")
    assert str(info.value) == "the LoRA baselines needs peft, which is not installed: pip install 'lsmfm[baselines]'"


def test_a_broken_installed_package_is_not_reported_as_missing(monkeypatch, tmp_path):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "__init__.py").write_text("import a_dependency_that_is_gone\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "peft", raising=False)
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_gone") as info:
        require("peft", "baselines", "the LoRA baselines")
    assert not isinstance(info.value, MissingExtra)


def test_an_unknown_extra_is_a_bug():
    with pytest.raises(ValueError, match="unknown extra"):
        require("json", "gpu", "nothing")
