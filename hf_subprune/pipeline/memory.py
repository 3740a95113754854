"""Give the memory of freed tensors back to the operating system.

glibc's malloc keeps freed pages in its heaps, and once a large tensor has been freed it serves tensors of up to
32 MB from the heap instead of fresh mappings. A pass over blocks of changing shapes then grows the resident set
by about one block per block although nothing stays live: 24 blocks of a 0.35B model ended a lazy prune at 1.2 GiB
resident with 0.1 GiB of live tensors. ``malloc_trim`` hands the free pages back (a few milliseconds); where the C
library is not glibc it is a no-op.

``MALLOC_MMAP_THRESHOLD_`` (an environment variable read by glibc at start) goes further: tensors above it get
their own mappings, returned when freed, for the lowest peak at some cost in page faults (see README, Scale).
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
