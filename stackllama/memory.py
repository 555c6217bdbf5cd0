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


def rss_now_mb() -> float:
    """Current resident set size of this process (MiB), from /proc (Linux) or psutil."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import psutil  # pragma: no cover - non-Linux

    return psutil.Process().memory_info().rss / 2**20


class PeakMemory:
    """Peak memory while the ``with`` block runs: VmRSS sampled every ``interval`` s in a daemon
    thread (``rss_mb``) and, on CUDA, torch's peak allocated memory (``cuda_mb``).

    The process's freed heap is handed back first (``release_free_memory``), so a build that
    follows another in the same process (Hydra's basic launcher runs a sweep's jobs in one)
    starts near what it holds; what the earlier jobs still hold is in the figure.
    """

    def __init__(self, interval: float = 0.05):
        import threading

        self.interval, self.rss_mb, self.cuda_mb = interval, 0.0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rss_mb = max(self.rss_mb, rss_now_mb())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        import torch

        release_free_memory()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        self._stop.set()
        self._thread.join()
        self.rss_mb = max(self.rss_mb, rss_now_mb())
        if torch.cuda.is_available():
            self.cuda_mb = torch.cuda.max_memory_allocated() / 2**20

    def metrics(self) -> dict[str, float]:
        out = {"memory/peak_rss_mb": round(self.rss_mb, 1)}
        if self.cuda_mb is not None:
            out["memory/peak_cuda_mb"] = round(self.cuda_mb, 1)
        return out
