"""Choose how many BLAS threads NumPy uses. On a Raspberry Pi the user picks 1-4."""

from __future__ import annotations

import os
import sys

_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")


def set_blas_threads(threads: int) -> str:
    """Limit BLAS to ``threads`` threads and say how it was done.

    Environment variables work only before NumPy loads its BLAS; after that, threadpoolctl (optional) can
    still change the live pools. mist's CLI imports NumPy lazily so the env route usually suffices.
    """
    if threads < 1:
        raise ValueError("--threads must be >= 1")
    if "numpy" not in sys.modules:
        for var in _ENV_VARS:
            os.environ[var] = str(threads)
        return "env"
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return "unchanged (numpy already loaded and threadpoolctl is not installed)"
    threadpool_limits(limits=threads, user_api="blas")
    return "threadpoolctl"
