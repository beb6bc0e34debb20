"""SharedSegment copies and the process tuning bulk transfers rely on."""

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import xxhash

from services.kvstore import segment as segment_module
from services.kvstore.main import serve
from services.kvstore.malloc_tuning import tune_malloc
from services.kvstore.segment import COPY_PIECE_BYTES, FUSED_MIN_BYTES, SharedSegment, copy_hashed
from services.kvstore.server import ServerConfig
from tests.ports import free_port

PAGE = 4096

# xxh3's length classes: short forms below FUSED_MIN_BYTES; then stripes of 64 bytes,
# blocks of 1 KiB, the last block and the last stripe handled apart (kernels/cpu/xxh3.h)
LENGTHS = [
    *[0, 1, FUSED_MIN_BYTES - 1, FUSED_MIN_BYTES, 256, 1023, 1024, 1025, 1088, 1089, 2048],
    *[2049, 16 * 1024 + 63, COPY_PIECE_BYTES, COPY_PIECE_BYTES + 1, 3 * COPY_PIECE_BYTES + 5],
]


@pytest.fixture(params=["native", "python"])
def copy_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(segment_module, "_fused_copy", lambda: None)
    else:
        assert segment_module._fused_copy() is not None, "the native kernels did not build"
    return str(request.param)


@pytest.mark.parametrize("nbytes", LENGTHS)
@pytest.mark.parametrize("offset", [64, 65], ids=["aligned", "unaligned"])
def test_copy_hashed_copies_exactly_and_returns_the_payload_checksum(
    nbytes: int, offset: int, copy_path: str
) -> None:
    source = os.urandom(nbytes)
    segment = SharedSegment.create(nbytes + 128, directory=None)
    slot = segment.view[offset : offset + nbytes]
    checksum = copy_hashed(slot, memoryview(source))
    assert checksum == xxhash.xxh3_64_intdigest(source)
    assert bytes(slot) == source
    assert bytes(segment.view[offset - 1 : offset]) == b"\0"  # nothing written outside
    assert bytes(segment.view[offset + nbytes : offset + nbytes + 1]) == b"\0"
    slot.release()
    segment.close()


def test_copy_hashed_refuses_mismatched_lengths() -> None:
    with pytest.raises(AssertionError, match="copy of 3 bytes into 2"):
        copy_hashed(memoryview(bytearray(2)), memoryview(b"abc"))


def test_tune_malloc_applies_on_glibc_once() -> None:
    assert tune_malloc() is True  # the CI image is glibc: mallopt accepted both settings
    assert tune_malloc.cache_info().currsize == 1


def _faults_writing(view: memoryview) -> int:
    """Minor page faults this process takes writing one byte into each 4 KiB page of view."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for at in range(0, len(view), PAGE):
        view[at] = 1
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.parametrize("side", ["shard", "client"])
def test_a_segment_is_mapped_writable_before_the_first_transfer(
    side: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MAP_POPULATE alone leaves shared pages read-only: each first write faulted (a put into
    # fresh slots ran at two thirds of the speed of a put into slots written before)
    pages = 4096
    shard = SharedSegment.create(pages * PAGE, tmp_path)
    segment = shard
    if side == "client":
        attached = SharedSegment.attach(str(shard.path), shard.size, shard.token)
        assert attached is not None
        segment = attached
    slots = segment.view[PAGE:]
    assert _faults_writing(slots) < pages // 16
    # the same write pass over a mapping populated only for reading faults on every page
    monkeypatch.setattr(segment_module, "_populate_writable", lambda buffer: None)
    unpopulated = SharedSegment.attach(str(shard.path), shard.size, shard.token)
    assert unpopulated is not None
    assert _faults_writing(unpopulated.view[PAGE:]) > pages // 2
    for s in {unpopulated, segment, shard}:
        s.close()


def test_a_new_segment_removes_the_files_of_shards_that_died(tmp_path: Path) -> None:
    """A shard killed (SIGKILL, a failed start) leaves its segment file; in a pod whose
    /dev/shm outlives container restarts each crash leaked a whole arena. The creator holds
    a flock for its lifetime, so a new shard removes exactly the files nobody holds."""
    live = SharedSegment.create(4096, tmp_path)
    script = (
        "import os, sys; from pathlib import Path; "
        "from services.kvstore.segment import SharedSegment; "
        f"s = SharedSegment.create(4096, Path({str(tmp_path)!r})); "
        "print(s.path, flush=True); os._exit(0)"  # dies without closing: its file stays
    )
    root = Path(__file__).parents[3]
    run = subprocess.run(
        [sys.executable, "-c", script], check=True, capture_output=True, text=True, cwd=root
    )
    dead = Path(run.stdout.strip())
    assert dead.exists() and live.path is not None and live.path.exists()
    fresh = SharedSegment.create(4096, tmp_path)
    assert not dead.exists()  # abandoned: removed
    assert live.path.exists() and fresh.path is not None and fresh.path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.path.name, fresh.path.name])
    live.close()
    fresh.close()
    assert list(tmp_path.iterdir()) == []


async def test_a_shard_that_fails_to_start_removes_its_segment(tmp_path: Path) -> None:
    """The metrics port in use: the shard failed after creating its segment and left it."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        config = ServerConfig(
            "s", 1 << 20, host="127.0.0.1", port=free_port(), shared_memory_dir=tmp_path
        )
        with pytest.raises(OSError):
            await serve(config, metrics_port=busy.getsockname()[1])
    assert list(tmp_path.iterdir()) == []


def test_an_arena_larger_than_its_directory_is_refused(tmp_path: Path) -> None:
    """The segment file is sparse: one larger than its tmpfs (a pod's /dev/shm is 64 MiB by
    default) mapped fine and then killed the shard with SIGBUS at the first write past it."""
    # 1 PiB: more than the directory has, and more than any file or mapping here can be,
    # so that without the check the create fails at once instead of filling the disk
    too_big = 2**50
    assert too_big > shutil.disk_usage(tmp_path).free
    with pytest.raises(ValueError, match="lower --capacity"):
        SharedSegment.create(too_big, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_shard_stopped_while_it_starts_removes_its_segment(tmp_path: Path) -> None:
    """SIGTERM while the arena was being populated killed the shard with its segment."""
    port = free_port()
    shard = subprocess.Popen(
        [sys.executable, "-m", "baton.cli", "kvstore", "--host", "127.0.0.1", "--port",
         str(port), "--capacity", "1GiB", "--shm-dir", str(tmp_path)],
        cwd=Path(__file__).parents[3], stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not any(tmp_path.iterdir()):  # the segment exists: the shard is populating it
        assert time.monotonic() < deadline and shard.poll() is None, shard.stderr
        time.sleep(0.005)
    shard.send_signal(signal.SIGTERM)
    assert shard.wait(timeout=60) == 0
    assert list(tmp_path.iterdir()) == []
