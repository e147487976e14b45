"""The data step: from row indices of a feature set to what a model's forward reads, once per batch.

Every model that trains or evaluates on a batch gets it from here, and a batch is prepared once however
many models read it (the members of a search share it):

    rows ──read (thread)──► staged  (B, k, T, d) in the storage dtype: fp16, or fp32 for a decoded int8/int4 set
                            │ cast, scale and running sum over the groups, with per-token statistics
                            ▼
    Batch.maps     FrozenMaps: F_j = s (x_0 + ... + x_j), (k, B, T, d), and mean/var (k, B, T)
                   what FastLAE reads (it touches F only as a GEMM operand: docs/performance.md)
    Batch.features (B, k, T, d) fp32, unscaled: what the readable LAE and the probe read

Which of the two a batch carries follows from the models that read it: each model says so with its
``reads`` attribute ("maps" or "features"). The next batch is read from the shards (memory-mapped, page
faults and all) in a background thread while the current one is in use; the staging buffer is handed back to
that thread as soon as the cast is done, and every buffer is reused for the whole run, so memory does not
grow with the set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from mist.formats import FeatureSet

from .errors import TrainingError
from .parallel import run_chunks

READS = ("maps", "features")


def split_rows(labels: np.ndarray, val_split: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows): a seeded fraction of each class's labelled rows held out.

    The draw depends on (seed, the labels) alone, so every run, search and study that asks for the same
    split gets the same rows."""
    labelled = np.nonzero(labels >= 0)[0]
    if val_split <= 0 or len(labelled) == 0:
        return labelled, np.zeros(0, np.int64)
    rng = np.random.default_rng([seed, 7919])
    val = []
    for c in np.unique(labels[labelled]):
        rows = labelled[labels[labelled] == c]
        take = int(round(len(rows) * val_split))
        val.append(rng.permutation(rows)[:take])
    val_rows = np.sort(np.concatenate(val))
    return np.setdiff1d(labelled, val_rows), val_rows


def nonfinite_error(fs: FeatureSet, rows: np.ndarray) -> TrainingError:
    return TrainingError(f"{fs.directory}: non-finite values in the features of rows {rows[:5].tolist()}")


def read_rows(fs: FeatureSet, rows: np.ndarray, chunk: int = 256) -> np.ndarray:
    """All of ``rows`` as one float32 (n, k, T, d) array, refusing NaN or inf (a full-batch fit reads this)."""
    out = np.empty((len(rows), *fs.row_shape), np.float32)
    for begin in range(0, len(rows), chunk):
        part = out[begin:begin + chunk]
        fs.read(rows[begin:begin + chunk], dtype=np.float32, out=part)
        finite = np.isfinite(part).reshape(len(part), -1).all(axis=1)
        if not finite.all():
            raise nonfinite_error(fs, rows[begin:begin + chunk][~finite])
    return out


# ---- the frozen maps FastLAE reads ---------------------------------------------------------------------


@dataclass
class FrozenMaps:
    """The frozen part of the state before each group's blocks, F_j = input_scale * (x_0 + ... + x_j).

    Laid out (k, B, T, d) so each F_j is one contiguous (B*T, d) GEMM operand; ``mean`` and ``var`` (k, B, T)
    are its per-token statistics (two-pass variance, computed once per batch).
    """

    maps: np.ndarray
    mean: np.ndarray
    var: np.ndarray

    def __len__(self) -> int:
        return self.maps.shape[1]

    def nonfinite_rows(self) -> np.ndarray:
        """Rows with a NaN or inf anywhere in their features: a non-finite value makes its token's mean or
        variance non-finite, in F_j and every later F (so no separate pass over the features is needed)."""
        ok = np.isfinite(self.mean) & np.isfinite(self.var)
        return np.nonzero(~ok.all(axis=(0, 2)))[0]


def empty_maps(k: int, n: int, T: int, d: int, dtype: np.dtype) -> FrozenMaps:
    return FrozenMaps(np.empty((k, n, T, d), dtype), np.empty((k, n, T), dtype), np.empty((k, n, T), dtype))


_CHUNK_BYTES = 1 << 20  # float32 maps per thread chunk of the data step: a few images, in cache for the statistics


def fill_maps(out: FrozenMaps, read: Callable[[slice], np.ndarray], n: int, input_scale: float) -> None:
    """Fill ``out`` from ``read(rows) -> (len(rows), k, T, d)``: cast, scale, sum the groups, per-token
    statistics, in thread chunks of about _CHUNK_BYTES of images (one ViT-B image, twenty-odd Lite0 ones),
    which stay in cache for the statistics.

    The statistics take two reads of the chunk, not four passes: the mean is a GEMV with a (d,) vector of
    1/d, and the variance E[f^2] - mu^2 with E[f^2] from one einsum. That form loses digits when the mean
    dominates the spread (mu^2 > var: it subtracts two close numbers), so those tokens alone are computed
    again the two-pass way; tests/test_fast_lae.py holds the result to the two-pass one."""
    maps, mean, var, dtype = out.maps, out.mean, out.var, out.maps.dtype
    k, _, T, d = maps.shape
    inv_d = np.full(d, 1.0 / d, dtype)

    def work(rows: slice) -> None:
        x = read(rows)
        with np.errstate(invalid="ignore", over="ignore"):  # non-finite rows: see FrozenMaps.nonfinite_rows
            for j in range(k):
                f = maps[j, rows]
                if input_scale != 1.0:  # as LAE: cast first, then scale in the compute dtype
                    np.multiply(x[:, j], input_scale, out=f, dtype=dtype)
                else:
                    f[...] = x[:, j]
                if j:
                    f += maps[j - 1, rows]
                mu = np.matmul(f, inv_d, out=mean[j, rows])
                v = np.einsum("ntd,ntd->nt", f, f, out=var[j, rows])
                v *= 1.0 / d
                v -= mu * mu
                close = np.nonzero(mu * mu > v)  # NaN compares False: a non-finite token stays so
                if len(close[0]):
                    centred = f[close] - mu[close][:, None]
                    v[close] = np.einsum("td,td->t", centred, centred) / d

    run_chunks(work, n, max(1, _CHUNK_BYTES // (T * d * maps.itemsize)))


def prepare_maps(x: np.ndarray, input_scale: float, dtype: np.dtype,
                 out: FrozenMaps | None = None) -> FrozenMaps:
    """x (B, k, T, d), any float dtype (fp16 on disk) -> FrozenMaps in ``dtype``; ``out`` is reused when its
    shape matches. Safe to call from several threads as long as each call has its own ``out``."""
    B, k, T, d = x.shape
    if out is None or out.maps.shape != (k, B, T, d) or out.maps.dtype != dtype:
        out = empty_maps(k, B, T, d, dtype)
    fill_maps(out, lambda rows: x[rows], B, input_scale)
    return out


# ---- batches ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One batch as every model reads it. Valid until the next batch is requested: its buffers are reused."""

    rows: np.ndarray
    labels: np.ndarray
    maps: FrozenMaps | None = None
    features: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def input_for(self, model) -> FrozenMaps | np.ndarray:
        """What ``model.forward`` takes: its ``reads`` names the field."""
        return self.maps if model.reads == "maps" else self.features


def needs_of(models: Iterable) -> set[str]:
    return {m.reads for m in models}


def batches(fs: FeatureSet, row_batches: Iterable[np.ndarray], needs: set[str], input_scale: float = 1.0,
            dtype: np.dtype | type = np.float32) -> Iterator[Batch]:
    """Yield a Batch for each array of row indices in ``row_batches``, the next one read ahead.

    ``needs`` says which fields to prepare ("maps", "features"); ``input_scale`` is the scale baked into the
    maps (the features stay unscaled: their readers scale them). Rows with NaN or inf raise TrainingError.
    """
    unknown = set(needs) - set(READS)
    if unknown:
        raise ValueError(f"unknown batch fields {sorted(unknown)}; expected some of {READS}")
    storage = fs.read_dtype  # fp16 for a float16 set; a quantised set is staged decoded, in fp32
    k, T, d = fs.manifest.row_shape
    buffers: dict[str, np.ndarray] = {}

    def buffer(name: str, shape: tuple[int, ...], kind: np.dtype, axis: int = 0) -> np.ndarray:
        """A reused buffer; a smaller batch (an epoch's last) is a view of the larger one."""
        buf = buffers.get(name)
        if buf is None or buf.shape[axis] < shape[axis]:
            buf = buffers[name] = np.empty(shape, kind)
        return buf[(slice(None),) * axis + (slice(0, shape[axis]),)]

    def read(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        staged = buffer("staged", (len(rows), k, T, d), storage)

        def work(part: slice) -> None:
            fs.read(rows[part], dtype=storage, out=staged[part])  # straight into the staging buffer

        run_chunks(work, len(rows), 4)
        return rows, staged

    it = iter(row_batches)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mist-readahead") as reader:
        first = next(it, None)
        pending = reader.submit(read, first) if first is not None else None
        while pending is not None:
            rows, staged = pending.result()
            n = len(rows)
            batch = Batch(rows, fs.labels[rows])
            if "maps" in needs:
                batch.maps = FrozenMaps(buffer("maps", (k, n, T, d), dtype, axis=1),
                                        buffer("mean", (k, n, T), dtype, axis=1),
                                        buffer("var", (k, n, T), dtype, axis=1))
                fill_maps(batch.maps, staged.__getitem__, n, input_scale)  # the cast, on the thread pool
                bad = batch.maps.nonfinite_rows()
            if "features" in needs:
                batch.features = buffer("features", (n, k, T, d), dtype)
                batch.features[...] = staged
                if "maps" not in needs:  # the maps' statistics already caught any NaN or inf
                    bad = np.nonzero(~np.isfinite(batch.features).reshape(n, -1).all(axis=1))[0]
            if needs and len(bad):
                raise nonfinite_error(fs, rows[bad])
            following = next(it, None)  # the staging buffer is free again: read the next batch into it
            pending = reader.submit(read, following) if following is not None else None
            yield batch
