"""Import MONAI without `transformers`; every lsmfm module imports this before its first MONAI import.

`import monai` loads every submodule, and its Transchex net imports transformers and BERT (seconds of
import time and ~100 MiB that inference and the losses do not need). With `transformers` unimportable
meanwhile, MONAI's optional imports fall back to placeholders (only Transchex, unused here, is affected);
transformers stays importable afterwards for the code that needs it (the text encoder). Nothing is done
when either package is already loaded.
"""
from __future__ import annotations

import sys


def import_monai_without_transformers() -> None:
    """Load MONAI's networks while `import transformers` fails; see the module doc."""
    if "monai" in sys.modules or "transformers" in sys.modules:
        return
    sys.modules["transformers"] = None  # type: ignore[assignment]  # makes `import transformers` fail
    try:
        import monai.networks.nets  # noqa: F401
    finally:
        if sys.modules.get("transformers", 0) is None:
            del sys.modules["transformers"]


import_monai_without_transformers()
