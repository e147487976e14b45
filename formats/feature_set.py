"""Write and read feature sets: a directory of safetensors shards plus ``manifest.json``.

Writing is shard by shard. Each shard is committed atomically and then the manifest is rewritten
atomically to list it, so after a crash the manifest names exactly the shards that are whole, marked
``"complete": false``, and a writer opened on the same directory with the same layout resumes there.

Reading validates every shard header up front, then serves rows straight from the files with
``np.memmap``: a batch costs the bytes of its rows, whatever the size of the set.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write, atomic_write_json
from .errors import FormatError
from .manifest import MANIFEST_NAME, Manifest, Shard
from .quant import FEATURES, SCALES, bad_scale, decode_features, encode_features, is_quantised, stored_shapes
from .safetensors_check import Header, expect_tensor, read_header, write_safetensors

LABELS, IDS = "labels", "ids"
_STORAGE = {"float16": np.dtype("<f2"), "float32": np.dtype("<f4")}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def set_identity(manifest: Manifest) -> str:
    """Which set a shard belongs to: the backbone, the Gather* layout, the storage dtype and the exact images.

    Written into every shard's metadata and checked on reading. Unlike the layout fingerprint it names only
    fields whose meaning is fixed, so adding a manifest field in a later minor version does not change it.
    """
    m = manifest
    body = [m.backbone.get("name"), m.backbone.get("weights_sha256"), m.groups, m.scale, m.tokens, m.dim, m.dtype,
            m.split, m.dataset.get("hash")]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ---- writing ----------------------------------------------------------------------------------------------


class FeatureSetWriter:
    """Accumulate rows and commit them as fixed-size shards.

    Shard boundaries depend only on ``shard_rows``, so a resumed run writes byte-identical shards to an
    uninterrupted one. Open with the manifest the set will have (shards empty); if the directory already
    holds an incomplete set with the same layout, writing continues after its last whole shard
    (``rows_done`` tells the caller how many source rows to skip).
    """

    def __init__(self, directory: str | os.PathLike, manifest: Manifest, shard_rows: int = 512,
                 overwrite: bool = False):
        if shard_rows < 1:
            raise ValueError("shard_rows must be >= 1")
        self.directory = Path(directory)
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
            _check_shard(self.directory, shard, existing, verify=True, index=index, start=index * self.shard_rows)
        listed = {s.file for s in existing.shards}
        for path in self.directory.glob("shard-*.safetensors*"):
            if path.name not in listed:  # written after the last manifest commit: not trusted, redo it
                path.unlink()
        self.manifest = existing

    def add(self, features: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> None:
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
        self._buffer.append((encode_features(features, self.manifest.dtype), np.asarray(labels), np.asarray(ids)))
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
            atomic_write_json(self.directory / MANIFEST_NAME, self.manifest.to_json())
        return self.manifest

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
        atomic_write_json(self.directory / MANIFEST_NAME, self.manifest.to_json())


def write_shard(directory: Path, index: int, manifest: Manifest, features: np.ndarray | dict[str, np.ndarray],
                labels: np.ndarray, ids: np.ndarray, row_start: int | None = None) -> Shard:
    """Commit one shard file atomically (its bytes depend only on the rows, ``index`` and the layout).

    ``features`` is a float (B, k, T, d) batch, encoded here in the manifest's dtype (int8/int4: quantised
    from fp32), or the tensors ``encode_features`` already made for it.

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


# ---- reading ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ShardView:
    path: Path
    rows: int
    start: int  # global index of the shard's first row
    offsets: dict[str, int]  # file offset of each stored feature tensor (features, and scales if quantised)
    stamp: tuple[int, int, int]  # (inode, size, mtime_ns) when the set was opened


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _check_shard(directory: Path, shard: Shard, manifest: Manifest, verify: bool, index: int | None = None,
                 start: int | None = None) -> Header:
    path = directory / shard.file
    header = read_header(path)
    n = shard.rows
    for name, (storage, shape) in stored_shapes(manifest.dtype, n, manifest.row_shape).items():
        expect_tensor(header, name, (storage,), shape)
    expect_tensor(header, LABELS, (np.dtype("<i8"),), (n,))
    expect_tensor(header, IDS, (np.dtype("<i8"),), (n,))
    _check_shard_metadata(header, manifest, index, start)
    if verify and sha256_file(path) != shard.sha256:
        raise FormatError(f"{path}: checksum mismatch (the file is corrupt or was modified)")
    if is_quantised(manifest.dtype):
        _check_scales(header)
    return header


def _check_scales(header: Header) -> None:
    """Every scale must be finite and > 0; the scales are 2 bytes a token, so reading them all is cheap."""
    entry = header.tensors[SCALES]
    with open(header.path, "rb") as f:
        f.seek(entry.offset)
        scales = np.frombuffer(f.read(entry.nbytes), dtype=entry.dtype).reshape(entry.shape)
    found = bad_scale(scales)
    if found is not None:
        (row, group, token), what = found
        raise FormatError(f"{header.path}: tensor 'scales' holds a {what} scale (row {row}, group {group}, "
                          f"token {token}); the shard is corrupt")


def _check_shard_metadata(header: Header, manifest: Manifest, index: int | None, start: int | None) -> None:
    """A shard says who it is (position, first row, set); each field present must agree with the manifest.

    Shards written before these fields existed lack some of them; what is absent is not checked.
    """
    meta = header.metadata
    # shard_index is checked against the index in the shard's own file name, not its manifest position: a
    # distributed extraction leaves a gap in the file indices where a chunk came out empty. row_start is
    # checked when a writer recorded it (the shard bytes of one process and of torchrun must match, and
    # torchrun cannot know it, so today's writers do not).
    named = re.fullmatch(r"shard-(\d+)\.safetensors", header.path.name)
    expected = {"shard_index": int(named.group(1)) if named else None, "row_start": start}
    for key, want in expected.items():
        if want is None or key not in meta:
            continue
        if meta[key] != str(want):
            raise FormatError(f"{header.path}: shard metadata says {key} {meta[key]!r}, where the set expects "
                              f"{want} (shards renamed, reordered or copied from another set?)")
    if "set_identity" in meta and meta["set_identity"] != set_identity(manifest):
        raise FormatError(f"{header.path}: shard belongs to another feature set than {MANIFEST_NAME} describes")


class FeatureSet:
    """A validated, read-only feature set. Rows are (k, T, d) maps; labels are -1 where unknown."""

    def __init__(self, directory: str | os.PathLike, verify: bool = False, allow_incomplete: bool = False):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FormatError(f"{self.directory}: not a feature-set directory")
        self.manifest = Manifest.load(self.directory / MANIFEST_NAME)
        if not self.manifest.complete and not allow_incomplete:
            raise FormatError(
                f"{self.directory}: incomplete feature set ({self.manifest.rows} rows in "
                f"{len(self.manifest.shards)} shards so far); rerun the extraction to resume it"
            )
        self._shards: list[_ShardView] = []
        labels, ids = [], []
        start = 0
        for index, shard in enumerate(self.manifest.shards):
            header = _check_shard(self.directory, shard, self.manifest, verify, index=index, start=start)
            shard_labels = self._read_small(header, LABELS)
            bad = (shard_labels < -1) | (shard_labels >= len(self.manifest.classes))
            if bad.any():
                raise FormatError(f"{header.path}: label {int(shard_labels[bad][0])} is out of range for "
                                  f"{len(self.manifest.classes)} classes (labels are class indices, or -1)")
            labels.append(shard_labels)
            ids.append(self._read_small(header, IDS))
            offsets = {name: header.tensors[name].offset
                       for name in stored_shapes(self.manifest.dtype, 0, self.row_shape)}
            self._shards.append(_ShardView(header.path, shard.rows, start, offsets, _stamp(header.path)))
            start += shard.rows
        self.labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        self.ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        unique_ids, counts = np.unique(self.ids, return_counts=True)
        if len(unique_ids) != len(self.ids):
            raise FormatError(f"{self.directory}: source id {int(unique_ids[counts > 1][0])} appears in more than "
                              "one row (a row stored twice would be trained on twice)")
        self._starts = np.array([s.start for s in self._shards], dtype=np.int64)
        # The narrowest dtype read() returns without loss: the storage dtype of a float set, fp32 when quantised.
        self._storage = _STORAGE.get(self.manifest.dtype, np.dtype("<f4"))
        self._stored = {name: storage for name, (storage, _) in
                        stored_shapes(self.manifest.dtype, 0, self.row_shape).items()}

    @staticmethod
    def _read_small(header: Header, name: str) -> np.ndarray:
        entry = header.tensors[name]
        with open(header.path, "rb") as f:
            f.seek(entry.offset)
            raw = f.read(entry.nbytes)
        if len(raw) != entry.nbytes:
            raise FormatError(f"{header.path}: truncated while it was being read")
        return np.frombuffer(raw, dtype=entry.dtype).astype(np.int64)

    def __len__(self) -> int:
        return self.manifest.rows

    @property
    def row_shape(self) -> tuple[int, int, int]:
        return self.manifest.row_shape

    @property
    def read_dtype(self) -> np.dtype:
        """The narrowest dtype ``read`` returns without loss: float16 for a float16 set, float32 when quantised."""
        return self._storage

    @property
    def num_classes(self) -> int:
        return len(self.manifest.classes)

    @property
    def fingerprint(self) -> str:
        """Identity of this exact set: layout plus every shard's checksum."""
        body = self.manifest.layout_fingerprint() + "".join(s.sha256 for s in self.manifest.shards)
        return hashlib.sha256(body.encode()).hexdigest()

    def verify(self) -> None:
        """Recompute every shard's sha256 against the manifest."""
        start = 0
        for index, shard in enumerate(self.manifest.shards):
            _check_shard(self.directory, shard, self.manifest, verify=True, index=index, start=start)
            start += shard.rows

    def check_values(self, chunk_rows: int = 256) -> dict[str, int]:
        """Read every feature (``chunk_rows`` at a time) and refuse NaN or inf, naming the first bad row.

        Returns row counts: ``rows``, ``labelled``, ``unlabelled`` and ``classes_present``.
        """
        for begin in range(0, len(self), chunk_rows):
            rows = np.arange(begin, min(begin + chunk_rows, len(self)))
            x = self.read(rows, dtype=self._storage)
            finite = np.isfinite(x).reshape(len(rows), -1).all(axis=1)
            if not finite.all():
                bad = int(rows[~finite][0])
                shard = self._shards[int(np.searchsorted(self._starts, bad, side="right") - 1)]
                raise FormatError(f"{shard.path}: row {bad - shard.start} (source id {int(self.ids[bad])}) holds "
                                  f"NaN or infinite features; {int((~finite).sum())} such rows in rows "
                                  f"{begin}-{rows[-1]}")
        labelled = self.labels >= 0
        return {"rows": len(self), "labelled": int(labelled.sum()), "unlabelled": int((~labelled).sum()),
                "classes_present": len(np.unique(self.labels[labelled]))}

    def read(self, rows: np.ndarray, dtype: np.dtype = np.float32, out: np.ndarray | None = None) -> np.ndarray:
        """Features for the given global row indices, in the given order, as (len(rows), k, T, d).

        Quantised sets are dequantised here, one batch at a time; ``out`` (C-contiguous, of that shape and
        ``dtype``) lets a caller reuse one buffer from batch to batch.
        """
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for a set of {len(self)} rows")
        shape = (len(rows), *self.row_shape)
        if out is None:
            out = np.empty(shape, dtype=dtype)
        elif out.shape != shape or out.dtype != np.dtype(dtype):
            raise ValueError(f"out has shape {out.shape} and dtype {out.dtype}, expected {shape} and {dtype}")
        quantised = is_quantised(self.manifest.dtype)
        # Quantised rows are gathered as stored (1 or 1/2 byte a value), then decoded once for the batch.
        stored = {name: np.empty((len(rows), *self._stored_shape(name)), storage)
                  for name, storage in self._stored.items()} if quantised else {FEATURES: out}
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard_of):
            view = self._shards[s]
            pick = np.nonzero(shard_of == s)[0]
            local = rows[pick] - view.start
            # A fresh memmap per read keeps no pages pinned between batches; sorted local rows read the
            # file front to back.
            order = np.argsort(local, kind="stable")
            for name, target in stored.items():
                mm = self._map(view, name)
                target[pick[order]] = mm[local[order]]
                del mm
        if quantised:
            if out.dtype == np.float32:
                decode_features(stored, self.manifest.dtype, self.row_shape, out=out)
            else:
                out[...] = decode_features(stored, self.manifest.dtype, self.row_shape)
        return out

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        """The per-row shape of a stored tensor: (k, T, d) codes, (k, T) scales, or (bytes,) packed int4."""
        return stored_shapes(self.manifest.dtype, 1, self.row_shape)[name][1][1:]

    def _map(self, view: _ShardView, name: str) -> np.memmap:
        """Map one stored tensor of a shard, refusing a file that was truncated, replaced or removed since
        opening: its rows would no longer be the ones the manifest and the checksum vouched for."""
        try:
            changed = _stamp(view.path) != view.stamp
            if not changed:
                return np.memmap(view.path, dtype=self._stored[name], mode="r", offset=view.offsets[name],
                                 shape=(view.rows, *self._stored_shape(name)))
        except FileNotFoundError:
            raise FormatError(f"{view.path}: removed while it was being read; restore the set and rerun") from None
        except (OSError, ValueError) as e:  # ValueError: mmap length is greater than the file (truncated)
            raise FormatError(f"{view.path}: unreadable while it was being read ({e})") from None
        raise FormatError(f"{view.path}: changed while it was being read (truncated, replaced or rewritten); "
                          "restore the set and rerun")

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                start_batch: int = 0, dtype: np.dtype = np.float32,
                ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Yield (features, labels, ids) minibatches; with ``shuffle`` the order across all shards is a
        permutation fixed by (seed, epoch), so a resumed run can skip ``start_batch`` batches exactly."""
        order = self.epoch_order(shuffle, seed, epoch)
        for begin in range(start_batch * batch_size, len(order), batch_size):
            rows = order[begin:begin + batch_size]
            yield self.read(rows, dtype), self.labels[rows], self.ids[rows]

    def epoch_order(self, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
        if not shuffle:
            return np.arange(len(self), dtype=np.int64)
        return np.random.default_rng([seed, epoch]).permutation(len(self))


def check_compatible(a: Manifest, b: Manifest, classes: bool = True) -> None:
    """Refuse to mix two sets (e.g. train and test) whose features mean different things.

    ``classes=False`` skips the class list, for predicting on an unlabelled set.
    """
    pairs = {
        "backbone.name": (a.backbone.get("name"), b.backbone.get("name")),
        "backbone.weights_sha256": (a.backbone.get("weights_sha256"), b.backbone.get("weights_sha256")),
        "gather.groups": (a.groups, b.groups),
        "gather.scale": (a.scale, b.scale),
        "gather.pool": (a.pool, b.pool),
        "tokens.count": (a.tokens, b.tokens),
        "tokens.prefix": (a.prefix_tokens, b.prefix_tokens),
        "tokens.grid": (a.grid, b.grid),
        "dim": (a.dim, b.dim),
        "data_config": (a.data_config, b.data_config),
    }
    if classes:
        pairs["classes"] = (a.classes, b.classes)
    for name, (x, y) in pairs.items():
        if x != y:
            raise FormatError(f"incompatible feature sets: '{name}' differs ({_short(x)} vs {_short(y)})")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

