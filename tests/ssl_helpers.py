"""Helpers for the SSL-model tests (test_ssl, test_text): a tiny offline BERT, blob patches, one thread."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

WORDS = ("mouse brain cleared light sheet nuclei stain gfap astrocytes vessels tdtomato viral gfp th dbh "
         "neurons ctip2 p75ntr syto24 signal sparse dense bright cells fibres cortex the a of and with in")


def write_tiny_bert(folder: Path, layers: int = 3, hidden: int = 32, seed: int = 0) -> Path:
    """Save a random BertModel (`layers` blocks, `hidden` wide) and its WordPiece tokenizer in `folder`."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", *sorted(set(WORDS.split()))]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast.from_pretrained(str(folder)).save_pretrained(str(folder))
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(folder))
    return folder


def blobs(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Patches of Gaussian blobs in [0, 1], (n, 1, size, size, size)."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[:size, :size, :size]
    out = np.zeros((n, 1, size, size, size), np.float32)
    for i in range(n):
        for _ in range(12):
            c, r = rng.uniform(4, size - 4, 3), rng.uniform(2, 5)
            out[i, 0] += np.exp(-((zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2) / (2 * r * r))
    return torch.from_numpy(np.clip(out, 0, 1))

