"""Read-ahead: while the model works on one batch, a background thread reads the next one from the shards,
casts it fp16 -> fp32 and computes its per-token statistics (FastLAE.fill), into the other of two buffers.

Reading goes a few rows at a time straight into the buffer, so a batch never exists twice (fp16 and fp32)
in memory, and the two buffers are reused for the whole run: memory does not depend on the set's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from mist.formats import FeatureSet

from .fast_lae import FastLAE, FrozenMaps


def read_batches(model: FastLAE, fs: FeatureSet, batches: Iterable[np.ndarray],
                 on_bad_rows: Callable[[np.ndarray], None]) -> Iterator[tuple[np.ndarray, FrozenMaps]]:
    """Yield (rows, FrozenMaps) for each array of row indices in ``batches``, one batch read ahead.

    ``on_bad_rows(rows)`` is called (and should raise) when rows hold NaN or inf. A yielded FrozenMaps is
    valid until the next one is requested: its buffer is then refilled.
    """
    storage = np.dtype(fs.manifest.dtype)
    k, T, d = fs.manifest.row_shape
    spare: list[FrozenMaps] = []

    def load(rows: np.ndarray) -> tuple[np.ndarray, FrozenMaps]:
        n = len(rows)
        buf = spare.pop() if spare else None
        if buf is None or buf.maps.shape[1] < n:
            buf = FrozenMaps(np.empty((k, n, T, d), model.dtype), np.empty((k, n, T), model.dtype),
                             np.empty((k, n, T), model.dtype))
        view = buf if buf.maps.shape[1] == n else FrozenMaps(buf.maps[:, :n], buf.mean[:, :n], buf.var[:, :n])
        model.fill(view, lambda part: fs.read(rows[part], dtype=storage), n)
        bad = view.nonfinite_rows()
        if len(bad):
            on_bad_rows(rows[bad])
        return rows, view, buf

    it = iter(batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mist-readahead") as reader:
        first = next(it, None)
        pending = reader.submit(load, first) if first is not None else None
        while pending is not None:
            rows, view, buf = pending.result()
            following = next(it, None)
            pending = reader.submit(load, following) if following is not None else None
            yield rows, view
            spare.append(buf)  # the consumer is done with it: the batch after next reuses it
