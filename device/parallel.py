"""A small thread pool for the elementwise work BLAS does not do: it splits the batch into chunks.

NumPy ufuncs and matmul release the GIL on arrays of any useful size, so chunks of the batch running in
threads use every core, the way BLAS already does for the big GEMMs. The pool has as many workers as BLAS has
threads (the user's ``--threads``), so the two never ask for more cores than the user gave.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_workers: int | None = None
_scratch = threading.local()
_controller: object | None = None  # threadpoolctl's, when installed: False once known to be missing


def worker_count() -> int:
    """How many threads elementwise work may use: the BLAS thread count, else the environment, else the CPUs."""
    global _workers
    if _workers is None:
        _workers = _blas_threads()
    return _workers


def _blas_threads() -> int:
    try:
        from threadpoolctl import threadpool_info

        counts = [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]
        if counts:
            return max(1, max(counts))
    except Exception:  # threadpoolctl is optional, and its probing of libraries may fail on odd builds
        pass
    for var in _ENV_VARS:
        if os.environ.get(var, "").isdigit():
            return max(1, int(os.environ[var]))
    return max(1, os.cpu_count() or 1)


def _get_pool() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=worker_count(), thread_name_prefix="mist-elementwise")
        return _pool


def chunks(n: int, size: int) -> list[slice]:
    size = max(1, size)
    return [slice(begin, min(begin + size, n)) for begin in range(0, n, size)]


def run_chunks(work: Callable[[slice], None], n: int, size: int) -> None:
    """Call ``work(rows)`` for consecutive slices of ``range(n)`` of at most ``size`` rows, on the pool.

    Chunks write disjoint rows, so they need no locks. The caller's np.errstate is applied in the workers
    too (it is thread-local), so e.g. the trainer's "ignore overflow, the loss check catches it" holds there.
    Chunking also bounds the scratch memory a chunk needs, so it is worth doing even on one thread.
    """
    parts = chunks(n, size)
    if worker_count() == 1 or len(parts) == 1:
        for rows in parts:
            work(rows)
        return
    err = np.geterr()

    def run(rows: slice) -> None:
        with np.errstate(**err):
            work(rows)

    with _blas_single_threaded():
        for future in [_get_pool().submit(run, rows) for rows in parts]:
            future.result()  # re-raises a worker's exception here


def _blas_single_threaded():
    """While the pool's chunks run, each BLAS call inside them (the attention's small matmuls) must use one
    thread: OpenBLAS would otherwise split each small GEMM over all cores again, and the chunks and its own
    threads would fight for the same cores (a step with 2 threads was no faster than with 1). The limit is
    process-wide and cheap (a few microseconds) with threadpoolctl; without it the chunks run as they are."""
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
        except Exception:  # optional dependency
            _controller = False
    if _controller is False:
        return contextlib.nullcontext()
    return _controller.limit(limits=1, user_api="blas")


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """A per-thread buffer, kept between calls: large fresh arrays cost a page fault per 4 KiB each time."""
    store = getattr(_scratch, "buffers", None)
    if store is None:
        store = _scratch.buffers = {}
    buf = store.get(name)
    if buf is None or buf.shape != shape or buf.dtype != dtype:
        buf = store[name] = np.empty(shape, dtype)
    return buf
