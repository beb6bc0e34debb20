"""SharedSegment: the memory a shard's block arena lives in.

A shard maps a file under /dev/shm so that clients on its host can map the same pages and
move blocks with one memcpy (docs/kvstore.md, "Shared memory"). The first page is the
segment header; block slots follow it:

    offset 0        8                24          4096
           | magic  | token (16 B)   | unused    | block slots ...                 |

A client proves it shares the shard's host by mapping the path the shard names and
reading the token the shard sent it over gRPC.
"""

from __future__ import annotations

import contextlib
import functools
import mmap
import os
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

MAGIC = b"BATONKV1"
TOKEN_BYTES = 16
HEADER_BYTES = 4096
COPY_PIECE_BYTES = 256 * 1024
"""Copies are hashed in pieces this large, so that each piece is hashed while it is still
in the core's L2 cache (512 KiB here): a checksum then costs ~1/6 of the copy instead of
a second pass over memory (bench/RESULTS.md)."""

Copy = Callable[[int, int, int], None]


@functools.cache
def _streaming_copy() -> Copy | None:
    """The native copy with cache-bypassing stores (kernels/cpu/copy.cpp), or None where
    the native kernels cannot run."""
    from kernels import native

    lib = native.library()
    return None if lib is None else lib.baton_copy_streaming


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def copy_hashed(dest: memoryview, source: memoryview) -> int:
    """Copies `source` into `dest` (same length); returns the xxh3-64 of the bytes copied.

    Each piece is hashed from the source right after the copy read it (cache-hot). Where
    the native kernels run, the copy writes around the caches: piece by piece, glibc's
    memcpy would read every destination line for ownership first, which halves its rate.
    """
    assert len(dest) == len(source), f"copy of {len(source)} bytes into {len(dest)}"
    if len(source) <= COPY_PIECE_BYTES:
        dest[:] = source
        return xxhash.xxh3_64_intdigest(source)
    copy = _streaming_copy()
    to, start_of = (_address(dest), _address(source)) if copy is not None else (0, 0)
    hasher = xxhash.xxh3_64()
    for start in range(0, len(source), COPY_PIECE_BYTES):
        stop = min(start + COPY_PIECE_BYTES, len(source))
        if copy is not None:
            copy(to + start, start_of + start, stop - start)
        else:
            dest[start:stop] = source[start:stop]
        hasher.update(source[start:stop])
    return hasher.intdigest()


class SharedSegment:
    """A mapped region: a shared-memory file, or anonymous memory when sharing is off."""

    def __init__(self, buffer: mmap.mmap, path: Path | None, token: bytes, owner: bool) -> None:
        self._mmap = buffer
        self.path = path
        self.token = token
        self._owner = owner
        self.size = len(buffer)
        self.view = memoryview(buffer)

    @classmethod
    def create(cls, size: int, directory: Path | None) -> SharedSegment:
        """A new zeroed segment of `size` bytes, shareable when `directory` is given.

        Pages are populated up front: a cache server's arena is its reason to exist, and a
        first touch on the transfer path would cost a page fault per 4 KiB.
        """
        size = HEADER_BYTES + size
        token = secrets.token_bytes(TOKEN_BYTES)
        populate = getattr(mmap, "MAP_POPULATE", 0)
        if directory is None:
            buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | populate)
            path = None
        else:
            path = directory / f"baton-kv-{os.getpid()}-{token.hex()[:12]}"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, size)
                buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | populate)
            except BaseException:
                path.unlink()
                raise
            finally:
                os.close(fd)
        buffer[: len(MAGIC) + TOKEN_BYTES] = MAGIC + token
        return cls(buffer, path, token, owner=True)

    @classmethod
    def attach(cls, path: str, size: int, token: bytes) -> SharedSegment | None:
        """Maps a shard's segment; None unless it is there and carries `token`."""
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size != size:
                return None
            buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        finally:
            os.close(fd)
        if buffer[: len(MAGIC) + TOKEN_BYTES] != MAGIC + token:
            buffer.close()
            return None
        return cls(buffer, Path(path), token, owner=False)

    def close(self) -> None:
        """Unmaps the segment; the shard that created it also removes its file."""
        self.view.release()
        # a slice may outlive the segment (say, in a traceback): it is unmapped when it goes
        with contextlib.suppress(BufferError):
            self._mmap.close()
        if self._owner and self.path is not None:
            self.path.unlink(missing_ok=True)
