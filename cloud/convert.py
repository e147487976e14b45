"""``mist-cloud convert``: re-encode a feature set in another storage dtype, without running the backbone.

Rows are decoded to fp32 and encoded again through the same ``mist.formats.quant.encode_features`` the
extraction uses, so converting an fp32 set to int8 gives the bytes ``extract --dtype int8`` would have
written. The writer commits whole shards atomically; an interrupted run resumes after its last whole shard
and finishes with the same bytes as an uninterrupted one. NumPy only: no torch is needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from mist.formats import FeatureSet, FeatureSetWriter, Manifest
from mist.formats.atomic import atomic_write_bytes
from mist.formats.quant import STORAGE_DTYPES, QuantError, bytes_per_row
from mist.formats.writer import MAX_SHARD_BYTES, capped_shard_rows
from mist.kit.text import counted

from .errors import CloudError

DEFAULT_SHARD_ROWS = 512
SKIPPED_NAME = "skipped.txt"  # cloud/extract.py's; not imported from there, which would load torch


def convert(source: Path, out: Path, dtype: str, shard_rows: int | None = None, overwrite: bool = False,
            batch_rows: int = 256, log: Callable[[str], None] = print, signer: Any = None,
            max_shard_bytes: int = MAX_SHARD_BYTES) -> Manifest:
    """Write the rows of the set at ``source`` to ``out`` in ``dtype``; return the new manifest, signed by
    ``signer`` (a ``mist.formats.signing.SigningKey``) when given.

    Shards are capped at ``MAX_SHARD_BYTES`` as extraction caps them: an int4 set converted to float32 has rows
    8x larger, and with the source's row count a shard could outgrow a FAT32 stick's 4 GiB."""
    if dtype not in STORAGE_DTYPES:
        raise CloudError(f"--dtype must be one of {STORAGE_DTYPES}, got {dtype!r}")
    if out.resolve() == source.resolve():
        raise CloudError(f"--out {out} is the set being converted; choose another directory")
    fs = FeatureSet(source, verify=True)
    src = fs.manifest
    if shard_rows is None:
        shard_rows = src.shards[0].rows if src.shards and src.shards[0].rows else DEFAULT_SHARD_ROWS
    row_bytes = bytes_per_row(dtype, src.row_shape)
    capped = capped_shard_rows(shard_rows, row_bytes, max_bytes=max_shard_bytes)
    if capped != shard_rows:
        log(f"shard rows {shard_rows} -> {capped}, so a shard stays under {max_shard_bytes:,} bytes "
            f"({row_bytes:,} bytes per row; FAT32 sticks hold files under 4 GiB)")
        shard_rows = capped
    writer = FeatureSetWriter(out, replace(src, dtype=dtype), shard_rows=shard_rows, overwrite=overwrite,
                              signer=signer)
    done = writer.rows_done
    if done:
        log(f"resuming: {counted(done, 'row')} in {counted(len(writer.manifest.shards), 'shard')} already written")
    log(f"converting {len(fs) - done} rows of {source} ({src.dtype}, {bytes_per_row(src.dtype, src.row_shape):,} "
        f"bytes a row) -> {dtype} ({bytes_per_row(dtype, src.row_shape):,} bytes a row) in {out}")
    for begin in range(done, len(fs), batch_rows):
        rows = np.arange(begin, min(begin + batch_rows, len(fs)))
        try:
            masks = fs.read_masks(rows) if src.task is not None else None  # label maps travel unchanged
            writer.add(fs.read(rows), fs.labels[rows], fs.ids[rows], masks)
        except QuantError as e:
            raise CloudError(f"{source}: rows {rows[0]}-{rows[-1]}: {e}; keep float16 or float32") from None
    final = writer.close()
    skipped = source / SKIPPED_NAME
    if skipped.exists():  # the record of images the extraction could not decode travels with the rows
        atomic_write_bytes(out / SKIPPED_NAME, skipped.read_bytes())
    log(f"wrote {counted(final.rows, 'row')} in {counted(len(final.shards), 'shard')} to {out}")
    return final
