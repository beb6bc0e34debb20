"""KV block transfer throughput and prefix-index latency, beside their peers.

    .venv/bin/python bench/kv_transfer.py [--sizes-mib 64 256 1024] [--repeats 5]

Starts one kvstore shard (a separate process, in-process index) and, for each total size,
puts and gets that many bytes of Llama-3-8B-shaped bf16 blocks (2 MiB each) over
(a) gRPC bytes and (b) the shared-memory path, measured beside a raw loopback TCP copy
(sendall -> recv_into a preallocated buffer, receiver in another process), a memcpy of
the same bytes, and grpcio itself moving the same messages between two processes with no
work on either side (the ceiling of any gRPC bytes path in Python). Each repeat measures
every path and peer once, in turn, so load from other processes on a shared machine
lands on both sides of a ratio alike. Then starts
redis-server and a Redis-indexed shard and times a 256-block prefix lookup, straight
against Redis and through the Lookup RPC, beside a PING (the round-trip floor).
Throughputs are medians over --repeats, in GB/s (1e9 bytes).

The bench's own tensor work (making the blocks, checking each get byte for byte, zeroing
the output) runs on one torch thread. With torch's default of one OpenMP thread per core,
the pool's workers keep spinning after each such op, and the gRPC put, which follows the
check of the shared-memory get, shared a core with them: 8-9 ms of their CPU inside a
64 MiB put, which took ~8 ms (18%) longer than the same put after a put; no peer paid
it (bench/RESULTS.md, session 22). The clients do no torch compute: this only keeps the
bench's bookkeeping out of the timed windows.
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
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import numpy as np
import redis.asyncio as redis
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.hashing import KVFingerprint
from engine.kv_format import KVBlockFormat
from proto.baton.v1 import kvstore_pb2 as pb
from proto.baton.v1 import kvstore_pb2_grpc as pb_grpc
from services.kvstore.client import ClientConfig, KVStoreClient
from services.kvstore.codec import MESSAGE_BYTES
from services.kvstore.malloc_tuning import tune_malloc
from services.kvstore.redis_index import RedisPrefixIndex
from services.kvstore.server import GRPC_OPTIONS
from services.kvstore.shard_client import CHANNEL_OPTIONS

FORMAT = KVBlockFormat(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bf16")
FINGERPRINT = KVFingerprint("bench/llama-3-8b-shape", "bench", "bf16", 1, "fp8", 16)
LOOKUP_BLOCKS = 256


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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


class SocketPeer:
    """Pushes a buffer through loopback TCP into another process's preallocated buffer."""

    def __init__(self, nbytes: int, repeats: int) -> None:
        self.port = free_port()
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        self.receiver = ctx.Process(
            target=_socket_receiver, args=(self.port, nbytes, repeats, ready)
        )
        self.receiver.start()
        ready.wait()

    def copy(self, source: memoryview) -> float:
        with socket.create_connection(("127.0.0.1", self.port)) as conn:
            began = time.perf_counter()
            conn.sendall(source)
            conn.recv(1)
            return time.perf_counter() - began

    def close(self) -> None:
        self.receiver.join()


async def _noop_put(requests: AsyncIterator[bytes], context: object) -> bytes:
    async for _ in requests:
        pass
    return b""


def _grpc_noop_server(port: int, message_bytes: int, ready: mp.synchronize.Event) -> None:
    tune_malloc()  # as a shard does
    payload = os.urandom(message_bytes)

    async def get(request: bytes, context: object) -> AsyncIterator[bytes]:
        for _ in range(int.from_bytes(request, "little")):
            yield payload

    async def serve() -> None:
        server = grpc.aio.server(options=GRPC_OPTIONS)
        handlers = {
            "Put": grpc.stream_unary_rpc_method_handler(_noop_put),
            "Get": grpc.unary_stream_rpc_method_handler(get),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("noop", handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        ready.set()
        await server.wait_for_termination()

    asyncio.run(serve())


class GrpcCeiling:
    """grpcio streaming `nbytes` in messages of `message_bytes` between this process and
    another one, doing nothing with them: what any gRPC bytes path in Python can reach."""

    def __init__(self, message_bytes: int) -> None:
        port = free_port()
        ctx = mp.get_context("spawn")
        ready = ctx.Event()
        self.server = ctx.Process(target=_grpc_noop_server, args=(port, message_bytes, ready))
        self.server.start()
        ready.wait()
        self.message = os.urandom(message_bytes)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        self._put = self.channel.stream_unary("/noop/Put")
        self._get = self.channel.unary_stream("/noop/Get")

    async def put(self, nbytes: int) -> float:
        async def messages() -> AsyncIterator[bytes]:
            for _ in range(-(-nbytes // len(self.message))):
                yield self.message

        return await timed(lambda: self._put(messages()))

    async def get(self, nbytes: int) -> float:
        async def drain() -> None:
            count = -(-nbytes // len(self.message))
            async for _ in self._get(count.to_bytes(8, "little")):
                pass

        return await timed(drain)

    async def close(self) -> None:
        await self.channel.close()
        self.server.terminate()
        self.server.join()


def memcpy(source: np.ndarray, dest: np.ndarray) -> float:
    began = time.perf_counter()
    np.copyto(dest, source)
    return time.perf_counter() - began


class Shard:
    """A kvstore shard in its own process, as `baton kvstore` runs it."""

    def __init__(self, capacity: str, redis_url: str | None = None, message_kib: int = 0) -> None:
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
        if message_kib:
            args += ["--message-bytes", f"{message_kib}KiB"]
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


async def timed(fn: Callable[[], Awaitable[object]]) -> float:
    began = time.perf_counter()
    await fn()
    return time.perf_counter() - began


async def put_get(
    client: KVStoreClient, blocks: torch.Tensor, out: torch.Tensor
) -> tuple[float, float]:
    """Seconds to put `blocks` under fresh hashes (a put of held blocks is a no-op), then
    get them back into `out`."""
    hashes = [os.urandom(32) for _ in range(len(blocks))]
    sources, dests = list(blocks), list(out)
    put = await timed(lambda: client.put(hashes, sources))
    get = await timed(lambda: client.get_into(hashes, dests))
    assert torch.equal(out.view(torch.uint8), blocks.view(torch.uint8))
    out.zero_()
    return put, get


async def transport_bytes(client: KVStoreClient, transport: str) -> float:
    shard = next(iter((await client.stats()).values()))
    return shard[f'baton_kv_transfer_bytes_total{{direction="get",transport="{transport}"}}']


def gbps(nbytes: int, times: list[float]) -> float:
    return nbytes / statistics.median(times) / 1e9


async def bench_transfers(sizes_mib: list[int], repeats: int, config: ClientConfig) -> None:
    shard = Shard(
        capacity=f"{max(sizes_mib) * 2 + 64}MiB", message_kib=config.message_bytes // 1024
    )
    shm_config = ClientConfig(timeout_s=120, shared_memory=True)
    rpc_config = ClientConfig(
        timeout_s=120,
        shared_memory=False,
        streams=config.streams,
        message_bytes=config.message_bytes,
    )
    ceiling = GrpcCeiling(config.message_bytes)
    try:
        await shard.ready()
        print(f"\n{TABLE_HEADER}")
        for mib in sizes_mib:
            n = mib * 2**20 // FORMAT.nbytes
            nbytes = n * FORMAT.nbytes
            blocks = torch.randn(n, *FORMAT.shape).to(FORMAT.torch_dtype)
            out = torch.zeros_like(blocks)
            src = blocks.view(-1).view(torch.uint8).numpy()
            dst = out.view(-1).view(torch.uint8).numpy()
            times: dict[str, list[float]] = defaultdict(list)
            peer = SocketPeer(nbytes, repeats)
            async with (
                KVStoreClient([shard.address], FINGERPRINT, FORMAT, shm_config) as shm,
                KVStoreClient([shard.address], FINGERPRINT, FORMAT, rpc_config) as rpc,
            ):
                for client in (shm, rpc):  # connect, negotiate shared memory, warm up
                    await put_get(client, blocks[:2], out[:2])
                await ceiling.put(FORMAT.nbytes)
                await ceiling.get(FORMAT.nbytes)
                for _ in range(repeats):
                    times["memcpy"].append(memcpy(src, dst))
                    times["socket"].append(peer.copy(memoryview(src.data)))
                    times["grpcio put"].append(await ceiling.put(nbytes))
                    times["grpcio get"].append(await ceiling.get(nbytes))
                    for name, client in (("shm", shm), ("grpc", rpc)):
                        put, get = await put_get(client, blocks, out)
                        times[f"{name} put"].append(put)
                        times[f"{name} get"].append(get)
                assert await transport_bytes(shm, "shm") > 0, "shared memory was not used"
                assert await transport_bytes(rpc, "grpc") > 0, "gRPC bytes were not used"
            peer.close()
            print(row(mib, {name: gbps(nbytes, t) for name, t in times.items()}), flush=True)
            del blocks, out, src, dst
    finally:
        await ceiling.close()
        shard.stop()


def row(mib: int, rate: dict[str, float]) -> str:
    def span(a: float, b: float, peer: float) -> str:
        return f"{100 * min(a, b) / peer:4.0f}-{100 * max(a, b) / peer:3.0f}%"

    copy, sock = rate["memcpy"], rate["socket"]
    shm, rpc, noop = (
        (rate[f"{name} put"], rate[f"{name} get"]) for name in ("shm", "grpc", "grpcio")
    )
    return (
        f"{mib:>5}MiB | {copy:6.2f} | {shm[0]:5.2f} {shm[1]:5.2f} | {span(*shm, copy)} | "
        f"{sock:6.2f} | {rpc[0]:5.2f} {rpc[1]:5.2f} | {span(*rpc, sock)} | "
        f"{noop[0]:5.2f} {noop[1]:5.2f} | {span(*noop, sock)}"
    )


TABLE_HEADER = (
    f"{'':>8} | {'':>6} | {'shm':^11} | {'shm /':>9} | {'':>6} | {'grpc':^11} | "
    f"{'grpc /':>9} | {'grpcio no-op':^11} | {'no-op /':>9}\n"
    f"{'size':>8} | {'memcpy':>6} | {'put':>5} {'get':>5} | {'memcpy':>9} | {'socket':>6} | "
    f"{'put':>5} {'get':>5} | {'socket':>9} | {'put':>5} {'get':>5} | {'socket':>9}\n" + "-" * 106
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def latencies(fn: Callable[[], Awaitable[object]], samples: int) -> list[float]:
    return [await timed(fn) for _ in range(samples)]


async def bench_lookup(samples: int) -> None:
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("\nlookup: redis-server not installed (make redis); skipped")
        return
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    redis_process = subprocess.Popen(
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
            ping = redis.Redis.from_url(url)
            assert len(await index.lookup(hashes)) == LOOKUP_BLOCKS
            assert len(await client.lookup(hashes)) == LOOKUP_BLOCKS
            rows: dict[str, list[float]] = {
                "PING (round-trip floor)": [],
                "redis index (one MGET)": [],
                "Lookup RPC": [],
            }
            for _ in range(10):  # interleaved, so a burst of load hits every row alike
                rows["PING (round-trip floor)"] += await latencies(ping.ping, samples // 10)
                rows["redis index (one MGET)"] += await latencies(
                    lambda: index.lookup(hashes), samples // 10
                )
                rows["Lookup RPC"] += await latencies(lambda: client.lookup(hashes), samples // 10)
            await index.close()
            await ping.aclose()
        print(f"\nprefix lookup of {LOOKUP_BLOCKS} blocks, {samples} samples")
        for name, times in rows.items():
            print(
                f"  {name:<28} p50 {percentile(times, 50) * 1e3:6.3f} ms   "
                f"p99 {percentile(times, 99) * 1e3:6.3f} ms"
            )
    finally:
        shard.stop()
        redis_process.terminate()
        redis_process.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mib", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lookup-samples", type=int, default=2000)
    parser.add_argument(
        "--message-kib", type=int, default=MESSAGE_BYTES // 1024, help="gRPC bulk message size"
    )
    parser.add_argument("--streams", type=int, default=ClientConfig.streams)
    parser.add_argument("--skip-lookup", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # no spinning OpenMP worker inside a timed window (see above)
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
        f"({FORMAT.nbytes / 2**20:.0f} MiB); gRPC messages {args.message_kib} KiB, "
        f"{args.streams} stream(s); load average {load_average()}"
    )
    config = ClientConfig(streams=args.streams, message_bytes=args.message_kib * 1024)
    asyncio.run(bench_transfers(args.sizes_mib, args.repeats, config))
    if not args.skip_lookup:
        asyncio.run(bench_lookup(args.lookup_samples))
    print(f"\nload average at the end: {load_average()}")


if __name__ == "__main__":
    main()
