"""Give the memory of freed tensors back to the operating system.

glibc's malloc keeps freed pages in its heaps, and once a large tensor has been freed it serves tensors of up to
32 MB from the heap instead of fresh mappings. A pass over blocks of changing shapes then grows the resident set
by about one block per block although nothing stays live: 24 blocks of a 0.35B model ended a lazy prune at 1.2 GiB
resident with 0.1 GiB of live tensors. ``malloc_trim`` hands the free pages back; where the C library is not glibc
it is a no-op. With it the 1.2B model of ``benchmarks/bench_scale.py`` peaks at 2.23 GiB instead of 3.32.

``MALLOC_MMAP_THRESHOLD_`` (an environment variable read by glibc at start) gives every tensor above it its own
mapping, returned when freed: it lowered the 0.35B model's peak further (0.88 -> 0.69 GiB) but not the 1.2B one's,
and cost 20-35% more time in page faults, so nothing sets it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["release_freed_memory"]


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Return the free pages of the C heap to the system (glibc), after a block or a site is done with."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
