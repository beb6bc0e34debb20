"""tune_malloc: keeps glibc from handing gRPC message buffers back to the kernel.

grpcio allocates every received message anew (its read slices, then two or three Python
copies of the message). With glibc's defaults a multi-MiB buffer is mmapped and unmapped
each time, or the heap top is trimmed after each message, so every byte of the next one
is page-faulted and zeroed again: on the receiving side of a transfer that cost as much
CPU as the copies themselves (bench/RESULTS.md). Shards and clients both receive bulk
messages, so both call this.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

from services.kvstore.codec import MAX_MESSAGE_BYTES

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

MMAP_THRESHOLD_BYTES = 2 * MAX_MESSAGE_BYTES
"""Allocations below this come from the heap: any bulk message with its framing."""
TRIM_THRESHOLD_BYTES = 128 * 2**20
"""Free heap kept for reuse before glibc returns it: a few streams' worth of messages,
small beside a worker's KV cache."""


@functools.cache
def tune_malloc() -> bool:
    """Sets glibc's mmap and trim thresholds for this process, once; False off glibc."""
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
