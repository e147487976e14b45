"""Small real feature sets without a backbone: sklearn's 8x8 digits, each image row a token.

The device tests need sets that are real (handwritten digits, not random numbers) and quick to learn,
but must not need torch. An 8x8 digit read as T=8 tokens, one per pixel row, is that.
Each token is the row's 8 pixels followed by a one-hot row position (d=16), the way a backbone's tokens
carry a position embedding; attention must combine rows to classify well.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mist.formats import FeatureSetWriter, Manifest


def digits_manifest(split: str, k: int = 1) -> Manifest:
    return Manifest(
        backbone={"name": "pixels-8x8", "weights_sha256": "0" * 64, "weights_source": "none",
                  "timm_version": "", "torch_version": ""},
        groups=[[j] for j in range(k)], scale="none", tokens=8, prefix_tokens=0, grid=[8, 1], dim=16,
        dtype="float16", data_config={"input_size": [1, 8, 8]}, classes=[str(i) for i in range(10)],
        split=split, dataset={"source": "sklearn.load_digits", "hash": "digits"},
    )


def load_digits_tokens() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    position = np.broadcast_to(np.eye(8), (len(d.images), 8, 8))
    tokens = np.concatenate([d.images / 16.0, position], axis=2)  # (n, 8 rows, 8 pixels + 8 position)
    return tokens.astype(np.float32), d.target.astype(np.int64)


def write_digits_set(directory: str | Path, rows: slice, split: str = "train", k: int = 1,
                     shard_rows: int = 128, unlabelled: bool = False) -> Path:
    """Write digits[rows] as a feature set; with k > 1, group j holds the image shifted by j pixels."""
    images, labels = load_digits_tokens()
    ids = np.arange(len(labels))[rows]
    images, labels = images[rows], labels[rows]
    maps = np.stack([np.roll(images, j, axis=2) for j in range(k)], axis=1)  # (n, k, 8, 16)
    writer = FeatureSetWriter(directory, digits_manifest(split, k), shard_rows=shard_rows)
    writer.add(maps, np.full_like(labels, -1) if unlabelled else labels, ids)
    writer.close()
    return Path(directory)
