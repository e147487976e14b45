"""Small feature sets for the format tests: a valid manifest, random rows, and a one-call writer.

Sizes are tiny (k=2, T=5, d=4) so a set of a few hundred rows is a few kilobytes and every test stays fast.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import FeatureSetWriter, Manifest
from mist.formats.feature_set import shard_name
from mist.formats.manifest import MANIFEST_NAME


def make_manifest(**overrides: Any) -> Manifest:
    """A manifest as the cloud would write it for a tiny ViT-like backbone, with no shards yet."""
    manifest = Manifest(
        backbone={"name": "vit_tiny_patch16_224", "weights_sha256": "ab" * 32, "weights_source": "test",
                  "timm_version": "1.0.0", "torch_version": "2.14.1"},
        groups=[[0, 1, 2], [3, 4, 5]],
        scale="none",
        tokens=5,
        prefix_tokens=1,
        grid=[2, 2],
        dim=4,
        dtype="float16",
        data_config={"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.5, 0.5, 0.5],
                     "std": [0.5, 0.5, 0.5], "crop_pct": 0.9, "crop_mode": "center"},
        classes=["cat", "dog", "eel"],
        split="train",
        dataset={"source": "synthetic", "hash": "cd" * 32},
        layer_names=[f"blocks.{i}" for i in range(6)],
    )
    return replace(manifest, **overrides)


def make_rows(manifest: Manifest, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random float32 features, labels with some -1 (unlabelled) and shuffled source ids."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((n, *manifest.row_shape)).astype(np.float32)
    labels = rng.integers(-1, len(manifest.classes), size=n).astype(np.int64)
    ids = rng.permutation(10 * n)[:n].astype(np.int64)
    return features, labels, ids


def write_set(directory: Path, manifest: Manifest, features: np.ndarray, labels: np.ndarray,
              ids: np.ndarray, shard_rows: int = 16, batch: int = 7) -> Manifest:
    """Write rows in uneven batches (7 does not divide 16), so batches straddle shard boundaries."""
    writer = FeatureSetWriter(directory, manifest, shard_rows=shard_rows)
    for begin in range(0, len(features), batch):
        end = begin + batch
        writer.add(features[begin:end], labels[begin:end], ids[begin:end])
    return writer.close()


def small_set(directory: Path, n: int = 40, shard_rows: int = 16, **overrides: Any) -> Manifest:
    """A complete set of ``n`` rows (40 = two full shards of 16 and a last one of 8)."""
    manifest = make_manifest(**overrides)
    return write_set(directory, manifest, *make_rows(manifest, n), shard_rows=shard_rows)


def shard_file(directory: Path, index: int) -> Path:
    return directory / shard_name(index)


def edit_manifest(directory: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Load manifest.json as plain JSON, let ``edit`` change it in place, write it back."""
    path = directory / MANIFEST_NAME
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def one_line(message: str) -> bool:
    return "\n" not in message and bool(message.strip())
