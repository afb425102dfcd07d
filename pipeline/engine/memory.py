"""glibc's allocator set up for tensor-sized blocks: freed memory is kept for the next batch.

By default glibc serves every block above its mmap threshold (at most 32 MB) with a fresh mmap, gives
each thread its own arena of 64 MB heaps (a larger block is mmap-ed whatever the threshold) and hands
freed memory back to the kernel. A CNN batch allocates activations of tens to hundreds of MB, frees
them and allocates them again for the next batch, so every page is faulted in anew each time and the
kernel's page-fault work can take most of the CPU time (bench/allocator.py measures it; the figures are in
docs/speed.md). One arena and thresholds of 1 GiB keep those blocks in the process. The cost: a process's
resident memory stays at its peak instead of shrinking between batches.

`use_tensor_friendly_malloc()` sets this for the running process with mallopt (the CLI calls it first; a
shard task calls it in a process that has not yet, since a dask worker may start with other settings,
e.g. dask's own trim threshold) and, through GLIBC_TUNABLES, for the processes it starts (a
LocalCluster's workers: the one arena must be set before a process's threads allocate). Workers of an
existing cluster are best started with GLIBC_TUNABLES set to `TUNABLES`. Other C libraries (macOS, musl)
keep their own behaviour.
"""
from __future__ import annotations

import ctypes
import functools
import os
import platform

THRESHOLD = 1 << 30
TUNABLES = (f"glibc.malloc.arena_max=1:glibc.malloc.mmap_threshold={THRESHOLD}:"
            f"glibc.malloc.trim_threshold={THRESHOLD}")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8  # malloc.h


@functools.cache
def use_tensor_friendly_malloc() -> bool:
    """Apply the settings above (once per process); False where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    for option, value in ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, THRESHOLD), (_M_TRIM_THRESHOLD, THRESHOLD)):
        if libc.mallopt(option, value) != 1:
            raise OSError(f"glibc's mallopt refused option {option} = {value}")
    inherited = os.environ.get("GLIBC_TUNABLES", "")
    if TUNABLES not in inherited:
        os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, (inherited, TUNABLES)))
    return True
