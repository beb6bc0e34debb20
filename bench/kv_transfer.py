"""KV block transfer throughput and prefix-index latency, beside their peers.

    .venv/bin/python bench/kv_transfer.py [--sizes-mib 64 256 1024] [--repeats 3]

Starts one kvstore shard (a separate process, in-process index) and, for each total size,
puts and gets that many bytes of Llama-3-8B-shaped bf16 blocks (2 MiB each) over
(a) gRPC bytes and (b) the shared-memory path, measured beside a raw loopback TCP copy
(sendall -> recv_into a preallocated buffer, receiver in another process) and a memcpy of
the same bytes. Then starts redis-server and a Redis-indexed shard and times a 256-block
prefix lookup, straight against Redis and through the Lookup RPC. Throughputs are the
median of --repeats runs, in GB/s (1e9 bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import grpc
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.hashing import KVFingerprint
from engine.kv_format import KVBlockFormat
from proto.baton.v1 import kvstore_pb2 as pb
from proto.baton.v1 import kvstore_pb2_grpc as pb_grpc
from services.kvstore.client import ClientConfig, KVStoreClient
from services.kvstore.redis_index import RedisPrefixIndex

FORMAT = KVBlockFormat(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bf16")
FINGERPRINT = KVFingerprint("bench/llama-3-8b-shape", "bench", "bf16", 1, "fp8", 16)
LOOKUP_BLOCKS = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _socket_receiver(port: int, nbytes: int, repeats: int, ready: mp.synchronize.Event) -> None:
    dest = np.empty(nbytes, dtype=np.uint8)
    dest.fill(0)  # touched: like the shard's pre-populated arena
    view = memoryview(dest.data)
    with socket.socket() as server:
        server.bind(("127.0.0.1", port))
        server.listen(1)
        ready.set()
        for _ in range(repeats):
            conn, _ = server.accept()
            with conn:
                got = 0
                while got < nbytes:
                    got += conn.recv_into(view[got:], min(nbytes - got, 4 << 20))
                conn.sendall(b"k")


def socket_copy(source: memoryview, repeats: int) -> list[float]:
    """Seconds to push `source` through loopback TCP into another process's buffer."""
    port = free_port()
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    receiver = ctx.Process(target=_socket_receiver, args=(port, len(source), repeats, ready))
    receiver.start()
    ready.wait()
    times = []
    for _ in range(repeats):
        with socket.create_connection(("127.0.0.1", port)) as conn:
            began = time.perf_counter()
            conn.sendall(source)
            conn.recv(1)
            times.append(time.perf_counter() - began)
    receiver.join()
    return times


def memcpy(source: np.ndarray, dest: np.ndarray, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        np.copyto(dest, source)
        times.append(time.perf_counter() - began)
    return times


class Shard:
    """A kvstore shard in its own process, as `baton kvstore` runs it."""

    def __init__(self, capacity: str, redis_url: str | None = None) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        args = [
            sys.executable,
            "-m",
            "services.kvstore.main",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--capacity",
            capacity,
            "--shard-id",
            f"bench-{self.port}",
            "--log-level",
            "WARNING",
        ]
        if redis_url:
            args += ["--redis-url", redis_url]
        root = Path(__file__).resolve().parent.parent
        self.process = subprocess.Popen(args, cwd=root)

    async def ready(self) -> None:
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = pb_grpc.KVStoreStub(channel)
            for _ in range(600):
                try:
                    if (await stub.ListShards(pb.ListShardsRequest(), timeout=1)).shards:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.05)
        raise RuntimeError(f"kvstore shard on {self.address} did not come up")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


async def timed(fn: Callable[[], Awaitable[object]], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - began)
    return times


async def transfer(
    address: str, shared_memory: bool, blocks: torch.Tensor, out: torch.Tensor, repeats: int
) -> tuple[list[float], list[float]]:
    config = ClientConfig(shared_memory=shared_memory, timeout_s=120)
    sources, dests = list(blocks), list(out)
    async with KVStoreClient([address], FINGERPRINT, FORMAT, config) as client:
        rounds = [[os.urandom(32) for _ in sources] for _ in range(repeats)]
        put_times, get_times = [], []
        for hashes in rounds:  # fresh hashes each round: a put of held blocks is a no-op
            put_times += await timed(partial(client.put, hashes, sources), 1)
            get_times += await timed(partial(client.get_into, hashes, dests), 1)
            assert torch.equal(out.view(torch.uint8), blocks.view(torch.uint8))
        shard = next(iter((await client.stats()).values()))
        assert (
            shard[
                'baton_kv_transfer_bytes_total{direction="get",transport="%s"}'
                % ("shm" if shared_memory else "grpc")
            ]
            > 0
        ), "wrong transport used"
    return put_times, get_times


def gbps(nbytes: int, times: list[float]) -> float:
    return nbytes / statistics.median(times) / 1e9


async def bench_transfers(sizes_mib: list[int], repeats: int) -> None:
    shard = Shard(capacity=f"{max(sizes_mib) * 2 + 64}MiB")
    try:
        await shard.ready()
        print(
            f"\n{'size':>8} | {'memcpy':>7} | {'shm put':>7} {'shm get':>7} | {'% memcpy':>9} "
            f"| {'socket':>7} | {'grpc put':>8} {'grpc get':>8} | {'% socket':>9}"
        )
        print("-" * 100)
        for mib in sizes_mib:
            n = mib * 2**20 // FORMAT.nbytes
            nbytes = n * FORMAT.nbytes
            blocks = torch.randn(n, *FORMAT.shape).to(FORMAT.torch_dtype)
            out = torch.zeros_like(blocks)
            src = blocks.view(-1).view(torch.uint8).numpy()
            dst = out.view(-1).view(torch.uint8).numpy()
            copy = gbps(nbytes, memcpy(src, dst, repeats))
            sock = gbps(nbytes, socket_copy(memoryview(src.data), repeats))
            shm_put, shm_get = await transfer(shard.address, True, blocks, out, repeats)
            rpc_put, rpc_get = await transfer(shard.address, False, blocks, out, repeats)
            shm = (gbps(nbytes, shm_put), gbps(nbytes, shm_get))
            rpc = (gbps(nbytes, rpc_put), gbps(nbytes, rpc_get))
            print(
                f"{mib:>5}MiB | {copy:7.2f} | {shm[0]:7.2f} {shm[1]:7.2f} | "
                f"{100 * min(shm) / copy:4.0f}-{100 * max(shm) / copy:3.0f}% | {sock:7.2f} | "
                f"{rpc[0]:8.2f} {rpc[1]:8.2f} | {100 * min(rpc) / sock:4.0f}-"
                f"{100 * max(rpc) / sock:3.0f}%"
            )
    finally:
        shard.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def bench_lookup(samples: int) -> None:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("\nlookup: redis-server not installed (make redis); skipped")
        return
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    redis = subprocess.Popen(
        [
            redis_server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    shard = Shard(capacity=f"{LOOKUP_BLOCKS * 2 + 64}MiB", redis_url=url)
    try:
        await shard.ready()
        blocks = torch.zeros(LOOKUP_BLOCKS, *FORMAT.shape, dtype=FORMAT.torch_dtype)
        hashes = [os.urandom(32) for _ in range(LOOKUP_BLOCKS)]
        async with KVStoreClient([shard.address], FINGERPRINT, FORMAT) as client:
            await client.put(hashes, list(blocks))
            index = RedisPrefixIndex(url)
            assert len(await index.lookup(hashes)) == LOOKUP_BLOCKS
            direct = await timed(lambda: index.lookup(hashes), samples)
            rpc = await timed(lambda: client.lookup(hashes), samples)
            await index.close()
        print(f"\nprefix lookup of {LOOKUP_BLOCKS} blocks, {samples} samples")
        for name, times in (("redis index (one Lua call)", direct), ("Lookup RPC", rpc)):
            print(
                f"  {name:<28} p50 {percentile(times, 50) * 1e3:6.3f} ms   "
                f"p99 {percentile(times, 99) * 1e3:6.3f} ms"
            )
    finally:
        shard.stop()
        redis.terminate()
        redis.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lookup-samples", type=int, default=2000)
    args = parser.parse_args()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    print(
        f"kv_transfer: {cpu}, {os.cpu_count()} cores, python {platform.python_version()}, "
        f"grpcio {grpc.__version__}; blocks {list(FORMAT.shape)} {FORMAT.dtype} "
        f"({FORMAT.nbytes / 2**20:.0f} MiB)"
    )
    asyncio.run(bench_transfers(args.sizes_mib, args.repeats))
    asyncio.run(bench_lookup(args.lookup_samples))


if __name__ == "__main__":
    main()
