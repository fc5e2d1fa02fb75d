"""Stop glibc from handing a training worker's freed memory back to the OS at every step.

A CPU training step allocates and frees the same few megabytes of activations every step.
glibc's malloc returns free memory at the top of a heap to the OS once it exceeds its trim
threshold (`madvise(MADV_DONTNEED)` in a thread's arena), and the next step faults those
pages back in, zero-filled. The threshold starts at 128 KiB and only rises when a large
mmapped chunk happens to be freed, so whether a worker pays this depends on what it
allocated before: the streamed classifier worker (Ray Train runs the loop in a thread of its
own) trimmed ~4 MB at every step, 43,000 page faults a second and 10 % of its CPU in the
kernel, which was most of what the Ray Data path cost over in-memory tensors
(bench_train_data.py). Fixed thresholds keep freed memory in the process for reuse: a worker
holds at most its peak, which it needs again at the next step anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

log = logging.getLogger("raybias")

# mallopt(3) parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 256 << 20  # free memory a heap keeps before trimming
MMAP_THRESHOLD = 32 << 20  # glibc's maximum: larger blocks are mapped (and unmapped) alone
USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Fix glibc's trim and mmap thresholds in this process (all threads and arenas).

    Returns whether they were set: not on another C library (macOS, musl), nor when the
    user set glibc's own MALLOC_*_ variables, which then decide.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(v in os.environ for v in USER_SETTINGS):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and ok
    except (OSError, AttributeError) as e:  # no loadable libc: nothing to tune
        log.debug("mallopt unavailable: %s", e)
        return False
    return ok
