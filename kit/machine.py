"""This machine's memory, read one way for both sides: what is available now, what is installed, and how much
address space this process holds.

Linux answers from /proc; elsewhere ``os.sysconf`` gives the physical memory and the rest is unknown (None),
which the callers treat as "no bound". Standard library only.
"""

from __future__ import annotations

import os


def _proc_field(path: str, key: str) -> int | None:
    """The ``key:  N kB`` line of a /proc file, in bytes; None when the file or the line is not there."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def physical_memory() -> int | None:
    """Bytes of RAM installed, or None when the system does not say."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def available_memory() -> int | None:
    """Bytes this machine can still give a process: MemAvailable on Linux, else the physical memory."""
    available = _proc_field("/proc/meminfo", "MemAvailable")
    return available if available is not None else physical_memory()


def address_space_used() -> int | None:
    """Bytes of address space this process holds now (VmSize), the base for an RLIMIT_AS bound; Linux only."""
    return _proc_field("/proc/self/status", "VmSize")
