"""Faults under load against `baton serve`: what each one costs the clients.

    python -m bench.chaos                      # every fault, 30 s of load after each
    python -m bench.chaos --faults decode-kill redis-restart --window 20

Starts redis-server (the prefix index), then `baton serve` with one prefill and two
decode replicas, and keeps --concurrency clients streaming greedy completions of exactly
--tokens tokens (min_tokens = max_tokens, so any other count is a lost or duplicated
token). After a quiet baseline it injects each fault in turn:

    decode-kill    SIGKILL the busiest decode replica (its requests migrate)
    prefill-kill   SIGKILL the prefill replica (decode prefills locally meanwhile)
    kvstore-kill   SIGKILL the KV store shard (baton serve restarts it; misses meanwhile)
    redis-flush    FLUSHALL on the index (shards re-announce their blocks)
    redis-restart  kill redis-server and start it again on the same port
    scale-down     decode 2 -> 1 replicas mid-load (the removed one drains), then back
    overload       a burst of 10x the router's in-flight limit: 429 + Retry-After for the
                   excess, the rest served, the router's memory bounded (RSS measured)

Per fault: requests started in its window, failed, tokens lost and duplicated in the
streams that completed, the time from the fault to the first request that began after it
and succeeded (recovery), and e2e p50 in the window against the baseline's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import redis
import yaml

MODEL = "smollm2-135m-instruct"
SYSTEM = (
    "You are the help desk of a small coastal town's public library. Answer questions "
    "about opening hours, borrowing rules, reading rooms and weekend events briefly. "
)
FAULTS = (
    "decode-kill",
    "prefill-kill",
    "kvstore-kill",
    "redis-flush",
    "redis-restart",
    "scale-down",
    "overload",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Result:
    start: float
    end: float
    status: int  # HTTP status; 0 when the connection failed
    tokens: int  # tokens received in the stream
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error


class Load:
    """Closed-loop streaming clients, recording every request."""

    def __init__(self, url: str, concurrency: int, tokens: int) -> None:
        self.url = url
        self.concurrency = concurrency
        self.tokens = tokens
        self.results: list[Result] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=600)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self._client(session, i) for i in range(self.concurrency)))

    async def _client(self, session: aiohttp.ClientSession, seed: int) -> None:
        rng = random.Random(seed)
        while not self.stop.is_set():
            question = f"Question {rng.randrange(10**6)}: when can I return a book?"
            self.results.append(await self._one(session, SYSTEM + question))

    async def _one(self, session: aiohttp.ClientSession, prompt: str) -> Result:
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": self.tokens,
            "min_tokens": self.tokens,
            "temperature": 0,
            "stream": True,
            "logprobs": 0,
        }
        start = time.monotonic()
        tokens, status, error = 0, 0, ""
        try:
            async with session.post(f"{self.url}/v1/completions", json=body) as r:
                status = r.status
                async for raw in r.content:
                    line = raw.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        error = event["error"].get("code") or "error"
                    for choice in event.get("choices", []):
                        tokens += len((choice.get("logprobs") or {}).get("tokens") or [])
                if status != 200:
                    error = error or f"http {status}"
        except (aiohttp.ClientError, TimeoutError) as e:
            error = type(e).__name__
        return Result(start, time.monotonic(), status, tokens, error)


class Cluster:
    """redis-server and `baton serve`, and the faults that can be done to them."""

    def __init__(self, workdir: Path, args: argparse.Namespace) -> None:
        self.workdir = workdir
        self.redis_port = free_port()
        self.redis = self._start_redis()
        self.http_port = free_port()
        config = {
            "prefill": {"replicas": 1, "linear": "fp8", "torch_threads": 1},
            "decode": {"replicas": 2, "linear": "int4", "torch_threads": 1},
            "kvstore": {
                "targets": [f"127.0.0.1:{free_port()}"],
                "capacity": "256MiB",
                "redis_url": f"redis://127.0.0.1:{self.redis_port}/0",
            },
            "router": {
                "http_port": self.http_port,
                "grpc_port": free_port(),
                "max_inflight_requests": args.max_inflight,
                "stall_timeout_s": 20,
            },
        }
        (workdir / "serving.yaml").write_text(yaml.safe_dump(config))
        self.log = workdir / "serve.log"
        baton = str(Path(sys.executable).parent / "baton")
        self.serve = subprocess.Popen(
            [baton, "serve", "--config", str(workdir / "serving.yaml")],
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        deadline = time.monotonic() + 600
        while "Ctrl-C stops everything" not in self.log.read_text():
            if self.serve.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"baton serve did not start:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)
        self.url = f"http://127.0.0.1:{self.http_port}"

    def _start_redis(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.redis_port)
        for _ in range(100):
            try:
                client.ping()
                return proc
            except redis.ConnectionError:
                time.sleep(0.1)
        raise SystemExit("redis-server did not start")

    def processes(self, marker: str) -> list[psutil.Process]:
        out = []
        for p in psutil.Process(self.serve.pid).children(recursive=True):
            try:
                if marker in " ".join(p.cmdline()):
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def busiest(self, marker: str) -> psutil.Process:
        procs = self.processes(marker)
        before = [sum(p.cpu_times()[:2]) for p in procs]
        time.sleep(1)
        busy = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before, strict=True)]
        return procs[busy.index(max(busy))]

    def ray_driver(self, statement: str) -> None:
        code = (
            "import ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False)\n"
            "from baton.local_autoscaler import ServeReplicas\n" + statement
        )
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)

    def router_rss(self) -> int:
        return sum(p.memory_info().rss for p in self.processes("ServeReplica:baton:router"))

    def inject(self, fault: str) -> Callable[[], None] | None:
        """Does the fault; returns what undoes it at the window's end, if anything."""
        if fault == "decode-kill":
            self.busiest("ServeReplica:baton:decode").kill()
        elif fault == "prefill-kill":
            self.processes("ServeReplica:baton:prefill")[0].kill()
        elif fault == "kvstore-kill":
            self.processes("services.kvstore.main")[0].kill()
        elif fault == "redis-flush":
            redis.Redis(port=self.redis_port).flushall()
        elif fault == "redis-restart":
            self.redis.kill()
            self.redis.wait()
            self.redis = self._start_redis()
        elif fault == "scale-down":
            self.ray_driver("ServeReplicas('baton').scale('decode', 1)")
            return lambda: self.ray_driver("ServeReplicas('baton').scale('decode', 2)")
        else:
            raise ValueError(fault)
        return None

    def close(self) -> None:
        if self.serve.poll() is None:
            self.serve.send_signal(signal.SIGINT)
            try:
                self.serve.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.serve.kill()
        self.redis.kill()


def summarize(
    label: str, results: list[Result], fault_at: float, end: float, tokens: int
) -> dict[str, float | str]:
    window = [r for r in results if r.end > fault_at and r.start < end]
    done = [r for r in window if r.ok]
    after = sorted((r for r in done if r.start >= fault_at), key=lambda r: r.end)
    return {
        "fault": label,
        "sent": len(window),
        "failed": len(window) - len(done),
        "lost": sum(max(0, tokens - r.tokens) for r in done),
        "dup": sum(max(0, r.tokens - tokens) for r in done),
        "recovery_s": after[0].end - fault_at if after else float("nan"),
        "e2e_p50_s": statistics.median(r.end - r.start for r in done) if done else float("nan"),
        "errors": ",".join(sorted({r.error for r in window if not r.ok}))[:60],
    }


async def overload(cluster: Cluster, limit: int) -> dict[str, object]:
    """10x the router's in-flight limit at once: 429s for the excess, bounded memory."""
    rss_before = cluster.router_rss()
    peak = rss_before
    statuses: list[int] = []
    retry_after: list[str | None] = []
    failures: list[str] = []

    async def one(session: aiohttp.ClientSession) -> None:
        body = {"model": MODEL, "prompt": SYSTEM, "max_tokens": 4, "temperature": 0}
        try:
            async with session.post(f"{cluster.url}/v1/completions", json=body) as r:
                await r.read()
                statuses.append(r.status)
                retry_after.append(r.headers.get("Retry-After"))
        except aiohttp.ClientError as e:
            statuses.append(0)
            failures.append(repr(e))

    async def watch(stop: asyncio.Event) -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, await asyncio.to_thread(cluster.router_rss))
            await asyncio.sleep(0.5)

    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        watcher = asyncio.create_task(watch(stop))
        started = time.monotonic()
        await asyncio.gather(*(one(session) for _ in range(10 * limit)))
        wall = time.monotonic() - started
        stop.set()
        await watcher
    shed = [s for s in statuses if s == 429]
    return {
        "sent": len(statuses),
        "served": statuses.count(200),
        "shed_429": len(shed),
        "with_retry_after": sum(
            1 for s, h in zip(statuses, retry_after, strict=True) if s == 429 and h
        ),
        "other": dict(Counter(s for s in statuses if s not in (200, 429))),
        "router_rss_mb": f"{rss_before / 2**20:.0f} -> peak {peak / 2**20:.0f}",
        "wall_s": round(wall, 1),
        "client_errors": sorted(set(failures))[:3],
    }


async def main_async(args: argparse.Namespace, cluster: Cluster) -> None:
    load = Load(cluster.url, args.concurrency, args.tokens)
    runner = asyncio.create_task(load.run())
    start = time.monotonic()
    await asyncio.sleep(args.baseline)
    rows = [summarize("(baseline)", load.results, start, time.monotonic(), args.tokens)]
    rows[0]["recovery_s"] = float("nan")
    overload_row = None
    for fault in args.faults:
        if fault == "overload":
            continue
        at = time.monotonic()
        undo = await asyncio.to_thread(cluster.inject, fault)
        print(f"{time.strftime('%H:%M:%S')} {fault}", flush=True)
        await asyncio.sleep(args.window)
        if undo is not None:
            await asyncio.to_thread(undo)
        rows.append(summarize(fault, load.results, at, time.monotonic(), args.tokens))
    load.stop.set()
    await runner
    if "overload" in args.faults:
        overload_row = await overload(cluster, args.max_inflight)
    print(f"\n{args.concurrency} streaming clients, {args.tokens} tokens each,", end=" ")
    print(f"{args.window:g} s per fault")
    print(f"{'fault':15s}{'sent':>6s}{'failed':>8s}{'lost':>6s}{'dup':>5s}", end="")
    print(f"{'recovery s':>12s}{'e2e p50 s':>11s}  errors")
    for r in rows:
        print(
            f"{r['fault']!s:15s}{r['sent']:6d}{r['failed']:8d}{r['lost']:6d}{r['dup']:5d}"
            f"{r['recovery_s']:12.1f}{r['e2e_p50_s']:11.1f}  {r['errors']}"
        )
    if overload_row is not None:
        print("\noverload (10x the in-flight limit at once):", overload_row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--faults", nargs="+", default=list(FAULTS), choices=FAULTS)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--baseline", type=float, default=30)
    ap.add_argument("--window", type=float, default=30)
    ap.add_argument("--max-inflight", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="baton-chaos-") as tmp:
        cluster = Cluster(Path(tmp), args)
        try:
            asyncio.run(main_async(args, cluster))
        finally:
            cluster.close()


if __name__ == "__main__":
    main()
