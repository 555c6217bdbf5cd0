"""glibc allocator controls for long CPU runs (PPO's phases): what torch's CPU allocator has no setting for.

Written by hand with ctypes because no maintained library exposes ``malloc_trim``/``mallopt``;
both are no-ops off Linux/glibc.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from typing import Any


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    """glibc, or None (macOS, musl, Windows): the allocator calls below are Linux/glibc only."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def set_malloc_mmap_threshold(megabytes: int | None) -> bool:
    """glibc only: serve allocations above ``megabytes`` MiB with mmap, returned to the OS on free.

    Lowest peak RSS, but every such allocation then costs fresh page faults: with a 1 MiB
    threshold the (episodes, tokens, vocabulary) temporaries made bench_ppo.py 1.8x slower.
    ``release_free_memory`` between phases gets most of the memory for none of the time.
    Returns whether it was applied.
    """
    libc = _libc()
    if megabytes is None or libc is None:
        return False
    M_MMAP_THRESHOLD = -3  # from <malloc.h>
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(megabytes) << 20))


def release_free_memory() -> None:
    """glibc only: give the heap memory freed so far back to the OS (``malloc_trim(0)``).

    glibc keeps freed heap pages, so the rollout, the no-grad pass and training, whose large
    temporaries have different shapes, each leave a freed heap behind and peak RSS climbs.
    Trimming between phases costs a few milliseconds; torch's CPU allocator has no setting
    of its own for it.
    """
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


__all__ = ["release_free_memory", "set_malloc_mmap_threshold"]
