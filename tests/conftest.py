"""Shared fixtures: the real data in ../shared/data (skipped with a reason when absent) and tiny configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny test networks run faster on one thread; two threads on two busy cores spin in OpenMP (20-100x slower).
# Set before torch is imported so subprocesses (CLI and multi-rank tests) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data; tests that need it skip cleanly in a user's clone."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent (only developers and CI have ../shared)")
    return SHARED_DATA
