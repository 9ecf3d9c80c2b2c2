"""Hold out whole volumes for validation: a split of catalog entries, never of patches.

A catalog entry is one volume with all its images (an `lsmfm catalog import-paper` entry is one brain
volume's folder of 96³ patches), so no patch of a validation volume, nor a neighbour of one, is trained
on. The paper's code meant the same ("fraction of volumes to use for training") but split its shuffled
file list, putting patches of one volume on both sides. The count follows the paper's: the first
floor(train share * n) shuffled entries train, the rest validate.

Example:
    >>> split_entries(["a", "b", "c", "d"], fraction=0.25, seed=0)
    (['a', 'b', 'c'], ['d'])
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from lsmfm.errors import ConfigError


def split_entries(entry_ids: Sequence[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train ids, validation ids) in catalog order; a seeded shuffle picks the held-out entries.

    Ids repeated across catalogs count as one volume. ConfigError when either side would be empty.
    """
    ids = list(dict.fromkeys(entry_ids))
    n_train = math.floor((1.0 - fraction) * len(ids) + 1e-9)
    if not 0 < n_train < len(ids):
        raise ConfigError(f"validation.fraction {fraction} of {len(ids)} catalog entries (volumes) leaves "
                          f"{n_train} to train and {len(ids) - n_train} to validate; both need at least one "
                          "(list more entries, or set validation.fraction: 0)")
    order = np.random.default_rng(seed).permutation(len(ids))
    held = {ids[i] for i in order[n_train:]}
    return [i for i in ids if i not in held], [i for i in ids if i in held]
