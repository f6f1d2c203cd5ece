"""Keep the daemon's memory flat when models stream through it in megabyte chunks.

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB), so after
the first few multi-MiB chunk buffers, later ones come from per-thread heap arenas, which
keep the freed memory. With 32 gRPC threads moving a multi-GiB model that is hundreds of
MiB of RSS that is never given back (measured: +0.5 GiB on a 0.4 GiB model). Pinning the
threshold at 1 MiB makes every chunk buffer its own mapping, returned to the OS on free,
and capping the arenas bounds what small allocations can strand.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("leptonfl.daemon")

M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # from glibc's malloc.h


def tune_malloc(mmap_threshold: int = 1 << 20, arena_max: int = 4) -> bool:
    """Apply the settings above where the C library is glibc; False (and a debug line) elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        log.debug("no glibc mallopt here (%s); malloc left as it is", name)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(M_ARENA_MAX, arena_max))
