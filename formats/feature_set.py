"""Read feature sets: a directory of safetensors shards plus ``manifest.json`` (writer.py writes them).

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
from typing import TYPE_CHECKING

import numpy as np

from .errors import FormatError
from .manifest import MANIFEST_NAME, Manifest, Shard
from .quant import FEATURES, SCALES, bad_scale, decode_features, is_quantised, stored_shapes
from .safetensors_check import Header, expect_tensor, open_regular, read_header

if TYPE_CHECKING:
    from .signing import Trust

LABELS, IDS = "labels", "ids"
MASKS = "masks"  # segmentation sets: (rows, H, W) uint8 label maps, SPEC §14
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
    with open_regular(path) as f:  # a FIFO or a device would block or never end
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


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


def check_shard(directory: Path, shard: Shard, manifest: Manifest, verify: bool, index: int | None = None,
                start: int | None = None) -> Header:
    """The header of ``shard``, once its tensors, metadata (and with ``verify`` its checksum) match ``manifest``;
    the reader checks every shard this way, and the writer the shards it resumes after."""
    path = directory / shard.file
    header = read_header(path)
    n = shard.rows
    for name, (storage, shape) in stored_shapes(manifest.dtype, n, manifest.row_shape).items():
        expect_tensor(header, name, (storage,), shape)
    expect_tensor(header, LABELS, (np.dtype("<i8"),), (n,))
    expect_tensor(header, IDS, (np.dtype("<i8"),), (n,))
    if manifest.label_size is not None:
        expect_tensor(header, MASKS, (np.dtype("u1"),), (n, *manifest.label_size))
    elif MASKS in header.tensors:
        raise FormatError(f"{path}: holds label maps ('{MASKS}') but {MANIFEST_NAME} describes no segmentation task")
    _check_shard_metadata(header, manifest, index, start)
    if verify and sha256_file(path) != shard.sha256:
        raise FormatError(f"{path}: checksum mismatch (the file is corrupt or was modified)")
    if is_quantised(manifest.dtype):
        _check_scales(header)
    return header


def _check_scales(header: Header) -> None:
    """Every scale must be finite and > 0; the scales are 2 bytes a token, so reading them all is cheap."""
    entry = header.tensors[SCALES]
    with open_regular(header.path) as f:
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

    def __init__(self, directory: str | os.PathLike, verify: bool = False, allow_incomplete: bool = False,
                 trust: Trust | None = None):
        """Open and check the set at ``directory``; with ``trust``, its manifest's signature is checked before
        anything else is read, and under ``require`` every shard is hashed (``verify``), since the signature
        vouches for the rows only through the checksums it pins."""
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FormatError(f"{self.directory}: not a feature-set directory")
        self.manifest = Manifest.load(self.directory / MANIFEST_NAME, trust)
        verify = verify or (trust is not None and trust.hashes_shards)
        if not self.manifest.complete and not allow_incomplete:
            raise FormatError(
                f"{self.directory}: incomplete feature set ({self.manifest.rows} rows in "
                f"{len(self.manifest.shards)} shards so far); rerun the extraction to resume it"
            )
        self._shards: list[_ShardView] = []
        labels, ids = [], []
        start = 0
        for index, shard in enumerate(self.manifest.shards):
            header = check_shard(self.directory, shard, self.manifest, verify, index=index, start=start)
            shard_labels = self._read_small(header, LABELS)
            bad = (shard_labels < -1) | (shard_labels >= len(self.manifest.classes))
            if bad.any():
                raise FormatError(f"{header.path}: label {int(shard_labels[bad][0])} is out of range for "
                                  f"{len(self.manifest.classes)} classes (labels are class indices, or -1)")
            labels.append(shard_labels)
            ids.append(self._read_small(header, IDS))
            offsets = {name: header.tensors[name].offset
                       for name in stored_shapes(self.manifest.dtype, 0, self.row_shape)}
            if self.manifest.label_size is not None:
                offsets[MASKS] = header.tensors[MASKS].offset
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
        with open_regular(header.path) as f:
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
            check_shard(self.directory, shard, self.manifest, verify=True, index=index, start=start)
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

    def read_masks(self, rows: np.ndarray) -> np.ndarray:
        """The (len(rows), H, W) uint8 label maps of a segmentation set, refusing a value that names no class."""
        size = self.manifest.label_size
        if size is None:
            raise FormatError(f"{self.directory}: a classification set; it holds no label maps")
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise IndexError(f"row index out of range for a set of {len(self)} rows")
        out = np.empty((len(rows), *size), np.uint8)
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard_of):
            view = self._shards[s]
            pick = np.nonzero(shard_of == s)[0]
            mm = self._map(view, MASKS, np.dtype("u1"), size)
            out[pick] = mm[rows[pick] - view.start]
            del mm
        bad = (out >= self.num_classes) & (out != self.manifest.task["ignore_index"])
        if bad.any():
            row = int(rows[np.nonzero(bad.any(axis=(1, 2)))[0][0]])
            raise FormatError(f"{self.directory}: the label map of row {row} holds a value above the "
                              f"{self.num_classes} classes that is not the ignore index 255; the shard is corrupt")
        return out

    def _stored_shape(self, name: str) -> tuple[int, ...]:
        """The per-row shape of a stored tensor: (k, T, d) codes, (k, T) scales, or (bytes,) packed int4."""
        return stored_shapes(self.manifest.dtype, 1, self.row_shape)[name][1][1:]

    def _map(self, view: _ShardView, name: str, dtype: np.dtype | None = None,
             shape: tuple[int, ...] | None = None) -> np.memmap:
        """Map one stored tensor of a shard, refusing a file that was truncated, replaced or removed since
        opening: its rows would no longer be the ones the manifest and the checksum vouched for."""
        try:
            changed = _stamp(view.path) != view.stamp
            if not changed:
                return np.memmap(view.path, dtype=dtype or self._stored[name], mode="r", offset=view.offsets[name],
                                 shape=(view.rows, *(shape or self._stored_shape(name))))
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
            # Name the innermost field that differs (data_config.crop_pct, not data_config): a whole object's
            # text would be cut off before the difference.
            while isinstance(x, dict) and isinstance(y, dict):
                key = next(k for k in sorted(set(x) | set(y), key=str) if x.get(k, ...) != y.get(k, ...))
                name, x, y = f"{name}.{key}", x.get(key, "(absent)"), y.get(key, "(absent)")
            raise FormatError(f"incompatible feature sets: '{name}' differs ({_short(x)} vs {_short(y)})")


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

