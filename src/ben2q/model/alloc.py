"""Process-wide allocator tuning for CPU inference (opt-in).

A base forward allocates and frees hundreds of large temporaries (up to 512 MB per image for
the full-size maps). glibc's malloc serves every block above its mmap threshold (at most
32 MB) with a fresh ``mmap`` and returns it with ``munmap`` when freed, so the kernel maps,
zeroes and faults in those pages again on every forward: millions of minor page faults and
a large share of system time. ``keep_freed_memory`` tells malloc to serve large blocks from
the heap and not to give freed memory back, so later forwards reuse warm pages.

The price is memory: the process keeps its high-water mark (plus ``top_pad``) for good, and
heap fragmentation can raise that mark above the peak of the default allocator; measure
before enabling it on a memory-tight host (``bench/engine.py`` prints peak RSS for both).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc <malloc.h>)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4

_INT_MAX = 2**31 - 1


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None  # not glibc (musl, macOS, ...): mallopt means something else or nothing
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory(*, top_pad: int = 1 << 30, trim_threshold: int = _INT_MAX) -> bool:
    """Make glibc malloc keep freed memory for reuse, for the whole process, from now on.

    Sets ``M_MMAP_MAX`` to 0 (no block gets its own mapping; large ones come from the heap),
    ``M_TRIM_THRESHOLD`` to ``trim_threshold`` bytes (free memory at the top of the heap is
    returned to the system only beyond it; the default, 2 GiB − 1, is mallopt's maximum)
    and ``M_TOP_PAD`` to ``top_pad`` bytes (extra heap requested per growth): the in-process
    equivalent of ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=… MALLOC_TOP_PAD_=…``.

    Returns True when all three were applied; False (changing nothing) where the C library
    is not glibc. Blocks mapped before the call are unaffected until freed.
    """
    libc = _glibc()
    if libc is None:
        log.info("keep_freed_memory: not glibc, allocator left as it is")
        return False
    trim_threshold = min(trim_threshold, _INT_MAX)
    top_pad = min(top_pad, _INT_MAX)
    ok = all(
        libc.mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_MAX, 0),
            (M_TRIM_THRESHOLD, trim_threshold),
            (M_TOP_PAD, top_pad),
        )
    )
    log.info(
        "keep_freed_memory: mmap off, trim threshold %d, top pad %d (%s)",
        trim_threshold,
        top_pad,
        "applied" if ok else "mallopt refused a value",
    )
    return ok
