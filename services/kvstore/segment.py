"""SharedSegment: the memory a shard's block arena lives in.

A shard maps a file under /dev/shm so that clients on its host can map the same pages and
move blocks with one memcpy (docs/kvstore.md, "Shared memory"). The first page is the
segment header; block slots follow it:

    offset 0        8                24          4096
           | magic  | token (16 B)   | unused    | block slots ...                 |

A client proves it shares the shard's host by mapping the path the shard names and
reading the token the shard sent it over gRPC.

The creating shard holds an exclusive `flock` on its file for as long as it lives; the
kernel drops it when the process dies, however it dies. A shard creating a segment first
removes every segment file in the directory that nobody holds (a crashed shard's: in a pod
whose /dev/shm outlives container restarts each crash would otherwise leak an arena).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import mmap
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import xxhash

MAGIC = b"BATONKV1"
TOKEN_BYTES = 16
HEADER_BYTES = 4096
COPY_PIECE_BYTES = 256 * 1024
"""Without the native kernels, copies are hashed in pieces this large, each while it is
still in the core's L2 cache (512 KiB here)."""
FUSED_MIN_BYTES = 241
"""The native copy hashes inputs of at least this many bytes (xxh3's long-input form)."""

CopyHashed = Callable[[int, int, int], int]


@functools.cache
def _fused_copy() -> CopyHashed | None:
    """The native copy that hashes what it moves (kernels/cpu/copy.cpp), or None where the
    native kernels cannot run."""
    from kernels import native

    lib = native.library()
    return None if lib is None else lib.baton_copy_xxh3


def _address(view: memoryview) -> int:
    if not view.readonly:  # a tenth of numpy's cost, which is 128 blocks x 3 us a put
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def copy_hashed(dest: memoryview, source: memoryview) -> int:
    """Copies `source` into `dest` (same length); returns the xxh3-64 of the bytes copied.

    Where the native kernels run, one pass reads the source, writes the destination around
    the caches and hashes each 64-byte stripe from registers (kernels/cpu/copy.cpp).
    Elsewhere each piece is hashed from the source right after the copy read it.
    """
    assert len(dest) == len(source), f"copy of {len(source)} bytes into {len(dest)}"
    fused = _fused_copy()
    if fused is not None and len(source) >= FUSED_MIN_BYTES:
        return int(fused(_address(dest), _address(source), len(source)))
    hasher = xxhash.xxh3_64()
    for start in range(0, len(source), COPY_PIECE_BYTES):
        stop = min(start + COPY_PIECE_BYTES, len(source))
        dest[start:stop] = source[start:stop]
        hasher.update(source[start:stop])
    return hasher.intdigest()


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14


def _populate_writable(buffer: mmap.mmap) -> None:
    """Maps every page of `buffer` writable now. MAP_POPULATE alone leaves a shared
    mapping's pages read-only, so the first write to each 4 KiB still faults (Linux does not
    dirty shared pages it populates): a 64 MiB shared-memory put into fresh slots ran 42-46%
    of memcpy, the same put into slots written before 63% (session 21). Older kernels
    refuse the advice; their first writes fault as before."""
    with contextlib.suppress(OSError, AttributeError, ValueError):
        buffer.madvise(MADV_POPULATE_WRITE)


class SharedSegment:
    """A mapped region: a shared-memory file, or anonymous memory when sharing is off."""

    def __init__(
        self,
        buffer: mmap.mmap,
        path: Path | None,
        token: bytes,
        owner: bool,
        lock_fd: int | None = None,
    ) -> None:
        self._lock_fd = lock_fd  # the creator's flock on its file, held until close
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
            remove_abandoned(directory)
            _check_room(directory, size)
            name = f"baton-kv-{os.getpid()}-{token.hex()[:12]}"
            # Locked under a name no sweep matches, then renamed: never visible unlocked.
            staging = directory / f".{name}.new"
            path = directory / name
            fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                os.ftruncate(fd, size)
                buffer = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | populate)
                os.rename(staging, path)
            except BaseException:
                staging.unlink(missing_ok=True)
                os.close(fd)
                raise
        _populate_writable(buffer)
        buffer[: len(MAGIC) + TOKEN_BYTES] = MAGIC + token
        return cls(buffer, path, token, owner=True, lock_fd=None if path is None else fd)

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
        _populate_writable(buffer)
        return cls(buffer, Path(path), token, owner=False)

    def close(self) -> None:
        """Unmaps the segment; the shard that created it also removes its file."""
        self.view.release()
        # a slice may outlive the segment (say, in a traceback): it is unmapped when it goes
        with contextlib.suppress(BufferError):
            self._mmap.close()
        if self._owner and self.path is not None:
            self.path.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = None


def _check_room(directory: Path, size: int) -> None:
    """ValueError unless `directory` has room for `size` bytes. The file is sparse until
    written: one larger than its filesystem (a pod's /dev/shm is 64 MiB by default) maps
    fine and then kills the shard with SIGBUS at the first write past the room."""
    free = shutil.disk_usage(directory).free
    if size > free:
        raise ValueError(
            f"the arena needs {size / 2**20:.0f} MiB of {directory}, which has "
            f"{free / 2**20:.0f} MiB free: lower --capacity, give {directory} more room, "
            "or serve without shared memory (--no-shared-memory)"
        )


def remove_abandoned(directory: Path) -> list[Path]:
    """Removes the segment files in `directory` that no live shard holds; returns them."""
    removed = []
    for path in directory.glob("baton-kv-*"):
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            continue  # gone already, or not ours to open
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a live shard holds it
        else:
            path.unlink(missing_ok=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed
