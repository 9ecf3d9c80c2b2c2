"""Make the packages named in LSMFM_BLOCK (comma separated) unimportable, as if not installed: put this
folder on PYTHONPATH of a subprocess (tests of the light install, `pip install lsmfm` without extras)."""
import os
import sys
from importlib.abc import MetaPathFinder


class _Blocked(MetaPathFinder):
    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named '{fullname}' (blocked by the test)", name=fullname)
        return None


_names = [n for n in os.environ.get("LSMFM_BLOCK", "").split(",") if n]
if _names:
    sys.meta_path.insert(0, _Blocked(_names))
