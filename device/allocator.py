"""Keep freed arrays from swelling the process: glibc's mmap threshold fixed at 128 KiB (no NumPy here: the
CLI calls this before --threads is applied).

glibc serves an allocation above M_MMAP_THRESHOLD with a mapping of its own, handed back to the system when
it is freed. By default the threshold follows the largest such block freed so far (up to 32 MiB); after the
first few MB-sized arrays are freed, the next ones come from the heap, where freed space is kept and
fragments. A training step allocates and frees (B, T, r)-sized arrays of 1-4 MB many times, and the heap
then held about 8 MB more than the live arrays (ViT-B shape, batch 32: peak RSS of one epoch 104 -> 96 MB,
docs/performance.md). Setting the threshold also turns its growth off. Elsewhere (no glibc) it does nothing.
"""

from __future__ import annotations

import ctypes

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def fix_mmap_threshold(size: int = 128 << 10) -> bool:
    """Serve every allocation above ``size`` bytes from its own mapping; True when the C library took it."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # not glibc (macOS, musl builds without mallopt)
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, size))
