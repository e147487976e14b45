"""Read-ahead: while the model works on one batch, a background thread reads the next one from the shards
(the memory-mapped copy, page faults and all) into a staging buffer in the storage dtype (fp16; fp32 for an
int8/int4 set, decoded as it is read).

At the start of a step the staged rows are cast to fp32 with their per-token statistics (FastLAE.fill, on
the thread pool) into the one float32 buffer, and the staging buffer is handed back to the reader at once.
A second float32 buffer would hide the cast too, but would cost 4 bytes per feature more than the 2 of
the staging buffer: the memory goal (128 MB at ViT-B, batch 32) decided. Both buffers are reused for the
whole run, so memory does not depend on the set's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mist.formats import FeatureSet

from .fast_lae import FastLAE, FrozenMaps
from .parallel import run_chunks


def read_batches(model: FastLAE, fs: FeatureSet, batches: Iterable[np.ndarray],
                 on_bad_rows: Callable[[np.ndarray], None]) -> Iterator[tuple[np.ndarray, FrozenMaps]]:
    """Yield (rows, FrozenMaps) for each array of row indices in ``batches``, the next batch's rows read ahead.

    ``on_bad_rows(rows)`` is called (and should raise) when rows hold NaN or inf. A yielded FrozenMaps is
    valid until the next one is requested: its buffer is then refilled.
    """
    storage = fs.read_dtype  # fp16 for a float16 set; a quantised set is staged decoded, in fp32
    row_shape = fs.manifest.row_shape
    buffers: dict[str, np.ndarray] = {}

    def buffer(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if name not in buffers or buffers[name].shape[0] < shape[0]:
            buffers[name] = np.empty(shape, dtype)
        return buffers[name][:shape[0]]

    def read(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        staged = buffer("staged", (len(rows), *row_shape), storage)

        def work(part: slice) -> None:
            staged[part] = fs.read(rows[part], dtype=storage)

        run_chunks(work, len(rows), 4)
        return rows, staged

    k, T, d = row_shape
    it = iter(batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mist-readahead") as reader:
        first = next(it, None)
        pending = reader.submit(read, first) if first is not None else None
        while pending is not None:
            rows, staged = pending.result()
            n = len(rows)
            if "maps" not in buffers or buffers["maps"].shape[1] < n:
                buffers["maps"] = np.empty((k, n, T, d), model.dtype)
                buffers["mean"], buffers["var"] = np.empty((k, n, T), model.dtype), np.empty((k, n, T), model.dtype)
            maps = FrozenMaps(buffers["maps"][:, :n], buffers["mean"][:, :n], buffers["var"][:, :n])
            model.fill(maps, staged.__getitem__, n)  # the cast, on the thread pool
            bad = maps.nonfinite_rows()
            if len(bad):
                on_bad_rows(rows[bad])
            following = next(it, None)  # the staging buffer is free again: read the next batch into it
            pending = reader.submit(read, following) if following is not None else None
            yield rows, maps
