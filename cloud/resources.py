"""Bound what one extraction may allocate, so a bad size is an error line instead of the kernel's OOM killer.

The guard:

- ``address_space_limit`` wraps the one-image probe forward (and model construction): an ``--img-size`` or
  ``--model-kwargs`` that would need more than the allowed memory makes torch's allocator fail at once,
  which is turned into a ``CloudError``, instead of the process swelling until it is killed.

The process's present address space is read through ``mist.kit.machine``, like every memory figure.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from mist.kit.machine import address_space_used
from mist.kit.text import format_bytes

from .errors import CloudError

try:  # POSIX only; elsewhere the guard is a no-op
    import resource
except ImportError:  # pragma: no cover
    resource = None

# Python, torch's libraries, thread stacks and allocator arenas reserve address space they never touch.
_ADDRESS_SLACK = 4 * 1024**3


@contextlib.contextmanager
def address_space_limit(extra_bytes: int | None, what: str) -> Iterator[None]:
    """Let the process grow by at most ``extra_bytes`` (plus slack) inside the block; refuse beyond."""
    now = address_space_used()
    if resource is None or extra_bytes is None or now is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = now + extra_bytes + _ADDRESS_SLACK
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    if soft != resource.RLIM_INFINITY:
        limit = min(limit, soft)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        text = str(e)
        if isinstance(e, RuntimeError) and "alloc" not in text.lower() and "memory" not in text.lower():
            raise
        raise CloudError(f"{what} needs more memory than allowed ({format_bytes(extra_bytes)}: --max-memory, or "
                         "what this machine has available); lower --img-size, --model-kwargs or raise "
                         "--max-memory") from None
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
