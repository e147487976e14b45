"""Write feature sets: a directory of safetensors shards plus ``manifest.json``, and how big a shard may be.

Writing is shard by shard. Each shard is committed atomically and then the manifest is rewritten
atomically to list it, so after a crash the manifest names exactly the shards that are whole, marked
``"complete": false``, and a writer opened on the same directory with the same layout resumes there.

The shard-size policy lives here too: ``capped_shard_rows`` keeps a shard under ``MAX_SHARD_BYTES``, so it
fits on a FAT32 stick and stays cheap to redo after an interruption.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_write, atomic_write_json
from .errors import FormatError
from .feature_set import IDS, LABELS, MASKS, check_shard, set_identity, sha256_file, shard_name
from .manifest import MANIFEST_NAME, Manifest, Shard, check_classes
from .quant import encode_features
from .safetensors_check import write_safetensors

if TYPE_CHECKING:
    from .signing import SigningKey

MAX_SHARD_BYTES = 1 << 30  # what `extract` aims for: well under FAT32's 4 GiB limit, and a cheap shard to redo


def capped_shard_rows(shard_rows: int, row_bytes: int, multiple: int = 1, max_bytes: int = MAX_SHARD_BYTES) -> int:
    """``shard_rows``, lowered so a shard's data stays under ``max_bytes``; a multiple of ``multiple``.

    Never below ``multiple`` rows: one batch per shard is the floor, whatever its size.
    """
    fit = max(max_bytes // max(row_bytes, 1), 1)
    if shard_rows <= fit:
        return shard_rows
    return max(fit // multiple, 1) * multiple


class FeatureSetWriter:
    """Accumulate rows and commit them as fixed-size shards.

    Shard boundaries depend only on ``shard_rows``, so a resumed run writes byte-identical shards to an
    uninterrupted one. Open with the manifest the set will have (shards empty); if the directory already
    holds an incomplete set with the same layout, writing continues after its last whole shard
    (``rows_done`` tells the caller how many source rows to skip).
    """

    def __init__(self, directory: str | os.PathLike, manifest: Manifest, shard_rows: int = 512,
                 overwrite: bool = False, signer: SigningKey | None = None):
        if shard_rows < 1:
            raise ValueError("shard_rows must be >= 1")
        self.directory = Path(directory)
        check_classes(manifest.classes, lambda why: FormatError(f"{self.directory}: the class names {why}"))
        self.signer = signer  # signs the complete manifest, in the same write that marks it complete
        self.shard_rows = shard_rows
        self.manifest = manifest.with_shards([], complete=False)
        self._buffer: list[tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]] = []
        self._buffered = 0
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest_path = self.directory / MANIFEST_NAME
        if manifest_path.exists() and not overwrite:
            self._resume(Manifest.load(manifest_path))
        else:
            self._clear()
            atomic_write_json(manifest_path, self.manifest.to_json())

    @property
    def rows_done(self) -> int:
        """Rows committed to whole shards (buffered rows not included)."""
        return self.manifest.rows

    def _clear(self) -> None:
        for path in self.directory.glob("shard-*.safetensors*"):
            path.unlink()

    def _resume(self, existing: Manifest) -> None:
        where = self.directory / MANIFEST_NAME
        if existing.complete:
            raise FormatError(f"{where}: the feature set is already complete; pass --overwrite to replace it")
        if existing.layout_fingerprint() != self.manifest.layout_fingerprint():
            field = _first_difference(existing.to_json(), self.manifest.to_json())
            raise FormatError(
                f"{where}: holds a partial set made with a different '{field}'; "
                "pass --overwrite to start again"
            )
        for index, shard in enumerate(existing.shards):
            if shard.rows != self.shard_rows:
                raise FormatError(f"{where}: partial set was written with {shard.rows} rows per shard, "
                                  f"not {self.shard_rows}; pass the same --shard-rows or --overwrite")
            check_shard(self.directory, shard, existing, verify=True, index=index, start=index * self.shard_rows)
        listed = {s.file for s in existing.shards}
        for path in self.directory.glob("shard-*.safetensors*"):
            if path.name not in listed:  # written after the last manifest commit: not trusted, redo it
                path.unlink()
        self.manifest = existing

    def add(self, features: np.ndarray, labels: np.ndarray, ids: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Buffer a batch of rows; full shards are written as soon as they fill.

        Rows are encoded in the storage dtype here (quantised per token for int8/int4, from fp32), so the
        buffer holds stored bytes, not fp32.
        """
        features = np.asarray(features)
        n = features.shape[0]
        if features.shape[1:] != self.manifest.row_shape:
            raise ValueError(f"features of shape {features.shape[1:]} per row, manifest says "
                             f"{self.manifest.row_shape}")
        if np.asarray(labels).shape != (n,) or np.asarray(ids).shape != (n,):
            raise ValueError("labels and ids need one entry per row")
        stored = encode_features(features, self.manifest.dtype)
        size = self.manifest.label_size
        if (masks is None) != (size is None) or (masks is not None and np.shape(masks) != (n, *size)):
            raise ValueError(f"label maps of shape {None if masks is None else np.shape(masks)}, the manifest "
                             f"says {None if size is None else (n, *size)}")
        if masks is not None:  # they travel with the features, row for row, into the same shards
            masks = np.asarray(masks)
            ignore = self.manifest.task["ignore_index"]
            if masks.dtype != np.uint8 or ((masks >= len(self.manifest.classes)) & (masks != ignore)).any():
                raise ValueError(f"label maps must be uint8 class indices below {len(self.manifest.classes)} "
                                 f"or {ignore}")
            stored[MASKS] = masks
        self._buffer.append((stored, np.asarray(labels), np.asarray(ids)))
        self._buffered += n
        while self._buffered >= self.shard_rows:
            self._flush(self.shard_rows)

    def close(self) -> Manifest:
        """Write the last partial shard and mark the set complete."""
        if self._buffered:
            # One manifest write lists the short last shard and marks the set complete together: an
            # incomplete manifest must list only full shards, or a crash between two writes here would leave
            # a set that refuses to resume (its last shard has the "wrong" row count).
            self._flush(self._buffered, complete=True)
        else:
            self.manifest = self.manifest.with_shards(self.manifest.shards, complete=True)
            atomic_write_json(self.directory / MANIFEST_NAME, self._manifest_json())
        return self.manifest

    def _manifest_json(self) -> dict[str, Any]:
        return manifest_json(self.manifest, self.signer if self.manifest.complete else None)

    def _flush(self, n: int, complete: bool = False) -> None:
        stored = {name: np.concatenate([b[0][name] for b in self._buffer]) for name in self._buffer[0][0]}
        labels = np.concatenate([b[1] for b in self._buffer])
        ids = np.concatenate([b[2] for b in self._buffer])
        rest = ({name: value[n:] for name, value in stored.items()}, labels[n:], ids[n:])
        self._buffer = [rest] if len(rest[1]) else []
        self._buffered = len(rest[1])

        shard = write_shard(self.directory, len(self.manifest.shards), self.manifest,
                            {name: value[:n] for name, value in stored.items()}, labels[:n], ids[:n])
        self.manifest = self.manifest.with_shards([*self.manifest.shards, shard], complete=complete)
        atomic_write_json(self.directory / MANIFEST_NAME, self._manifest_json())


def manifest_json(manifest: Manifest, signer: SigningKey | None = None) -> dict[str, Any]:
    """The manifest's JSON, signed by ``signer`` when given (formats/signing.py; SPEC §13)."""
    body = manifest.to_json()
    if signer is not None:
        from .signing import SIGNATURE, manifest_message

        body[SIGNATURE] = signer.sign(manifest_message(body))
    return body


def write_shard(directory: Path, index: int, manifest: Manifest, features: np.ndarray | dict[str, np.ndarray],
                labels: np.ndarray, ids: np.ndarray, row_start: int | None = None) -> Shard:
    """Commit one shard file atomically (its bytes depend only on the rows, ``index`` and the layout).

    ``features`` is a float (B, k, T, d) batch, encoded here in the manifest's dtype (int8/int4: quantised
    from fp32), or the tensors ``encode_features`` already made for it (plus, in a segmentation set, the
    ``masks`` label maps).

    ``row_start`` (the global index of the shard's first row) is recorded when the caller knows it, i.e. when
    the shard is also the ``index``-th entry of the manifest; a reader then checks both (see
    ``_check_shard_metadata``). Distributed extraction, whose chunks may come out short or empty, passes None.
    """
    name = shard_name(index)
    stored = features if isinstance(features, dict) else encode_features(features, manifest.dtype)
    tensors = {
        # safetensors 0.8 writes the wrong bytes for non-contiguous arrays, without a warning.
        **{key: np.ascontiguousarray(value) for key, value in stored.items()},
        LABELS: np.ascontiguousarray(labels, dtype=np.int64),
        IDS: np.ascontiguousarray(ids, dtype=np.int64),
    }
    metadata = {"format": "mist-feature-shard", "set_layout": manifest.layout_fingerprint(),
                "shard_index": str(index), "rows": str(len(ids)), "set_identity": set_identity(manifest)}
    if row_start is not None:
        metadata["row_start"] = str(row_start)
    path = Path(directory) / name
    # Not safetensors' save_file: its metadata order varies, so a resumed set would not match (see there).
    atomic_write(path, lambda tmp: write_safetensors(tmp, tensors, metadata))
    return Shard(file=name, rows=len(ids), sha256=sha256_file(path))


def refuse_complete(directory: str | os.PathLike) -> None:
    """Refuse, as a writer opened without ``overwrite`` would, a directory that already holds a complete set:
    callers check it before costly work (``extract`` before loading the model). A manifest that cannot be
    read is left for the writer to report."""
    path = Path(directory) / MANIFEST_NAME
    try:
        complete = path.is_file() and Manifest.load(path).complete
    except FormatError:
        return
    if complete:
        raise FormatError(f"{path}: the feature set is already complete; pass --overwrite to replace it")


def sign_feature_set(directory: str | os.PathLike, key: SigningKey) -> Manifest:
    """Sign the complete set at ``directory`` (``mist-cloud sign``): every shard header and checksum is checked
    against the manifest first, so a set modified since it was written is never vouched for."""
    from .feature_set import FeatureSet

    fs = FeatureSet(directory, verify=True)
    atomic_write_json(fs.directory / MANIFEST_NAME, manifest_json(fs.manifest, key))
    return fs.manifest


def _first_difference(a: dict, b: dict, prefix: str = "") -> str:
    for key in sorted(set(a) | set(b)):
        if key in ("shards", "rows", "complete"):
            continue
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            found = _first_difference(va, vb, f"{prefix}{key}.")
            if found:
                return found
        elif va != vb:
            return f"{prefix}{key}"
    return ""
