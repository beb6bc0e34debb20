"""Load generator for any OpenAI-compatible completions endpoint.

    # an endpoint that is already up
    python bench/serve.py --url http://127.0.0.1:8000 --label mine --concurrency 1 4 8
    # or let the script start each server in turn, same prompts, same box, one run
    python bench/serve.py --launch baton-disaggregated baton-colocated \\
        llama-server=/path/to/llama-server --plot bench/serve.png

Workloads: `random` (--prompt-tokens, --output-tokens, distinct prompts) at each
concurrency or request rate (Poisson arrivals), and `shared-prefix` (requests sharing a
--system-tokens system prompt, each with a --question-tokens question). Every request
streams; TTFT is the first token's arrival, ITL the gaps between later tokens, e2e the
whole request. Goodput counts requests per second that met both --ttft-slo-ms and
--itl-slo-ms (p90 of the request's gaps). Prints one table and writes a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from engine.loaders import default_model_path, load_checkpoint

WORDS = [
    "river",
    "stone",
    "lantern",
    "harbor",
    "meadow",
    "copper",
    "signal",
    "orchard",
    "thunder",
    "velvet",
    "compass",
    "ember",
    "glacier",
    "whisper",
    "canyon",
    "mirror",
    "falcon",
    "garden",
    "pillar",
    "quartz",
    "saddle",
    "timber",
    "voyage",
    "window",
]


@dataclass
class Result:
    ttft: float
    itls: list[float]
    e2e: float
    output_tokens: int
    ok: bool
    error: str = ""


@dataclass
class Run:
    label: str
    workload: str
    load: str  # "c=8" or "rate=2.0"
    wall: float
    results: list[Result] = field(default_factory=list)


def make_text(tokenizer: Any, n_tokens: int, rng: random.Random) -> str:
    """Text that the model's tokenizer turns into exactly `n_tokens` tokens."""
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words))) < n_tokens:
        words.append(rng.choice(WORDS))
    ids = tokenizer.encode(" ".join(words))[:n_tokens]
    text: str = tokenizer.decode(ids)
    return text


async def one_request(
    session: aiohttp.ClientSession, url: str, model: str, prompt: str, max_tokens: int
) -> Result:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
        "min_tokens": max_tokens,
    }
    start = time.perf_counter()
    stamps: list[float] = []
    try:
        async with session.post(f"{url}/v1/completions", json=body) as r:
            if r.status != 200:
                return Result(0, [], 0, 0, False, f"HTTP {r.status}: {(await r.text())[:200]}")
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    stamps.append(time.perf_counter())
    except (aiohttp.ClientError, TimeoutError) as e:
        return Result(0, [], 0, 0, False, repr(e))
    if not stamps:
        return Result(0, [], 0, 0, False, "no tokens")
    itls = [b - a for a, b in itertools.pairwise(stamps)]
    return Result(stamps[0] - start, itls, stamps[-1] - start, len(stamps), True)


async def run_closed_loop(
    url: str, model: str, prompts: list[str], max_tokens: int, concurrency: int
) -> tuple[list[Result], float]:
    queue = list(prompts)
    results: list[Result] = []
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(force_close=True)  # no stale keep-alive connections
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def worker() -> None:
            while queue:
                results.append(await one_request(session, url, model, queue.pop(0), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results, time.perf_counter() - start


async def run_open_loop(
    url: str, model: str, prompts: list[str], max_tokens: int, rate: float, seed: int
) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(force_close=True)  # no stale keep-alive connections
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        start = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(one_request(session, url, model, p, max_tokens)))
            await asyncio.sleep(rng.expovariate(rate))
        results = list(await asyncio.gather(*tasks))
    return results, time.perf_counter() - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def summarize(run: Run, ttft_slo: float, itl_slo: float) -> dict[str, float]:
    ok = [r for r in run.results if r.ok]
    itls = [x for r in ok for x in r.itls]
    good = [r for r in ok if r.ttft <= ttft_slo and pct(r.itls, 90) <= itl_slo]
    return {
        "requests": len(run.results),
        "failed": len(run.results) - len(ok),
        "req_s": len(ok) / run.wall,
        "out_tok_s": sum(r.output_tokens for r in ok) / run.wall,
        "ttft_p50": pct([r.ttft for r in ok], 50) * 1e3,
        "ttft_p90": pct([r.ttft for r in ok], 90) * 1e3,
        "ttft_p99": pct([r.ttft for r in ok], 99) * 1e3,
        "itl_p50": pct(itls, 50) * 1e3,
        "itl_p90": pct(itls, 90) * 1e3,
        "itl_p99": pct(itls, 99) * 1e3,
        "e2e_p50": pct([r.e2e for r in ok], 50) * 1e3,
        "e2e_p90": pct([r.e2e for r in ok], 90) * 1e3,
        "e2e_p99": pct([r.e2e for r in ok], 99) * 1e3,
        "goodput": len(good) / run.wall,
    }


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def launch(spec: str, port: int, threads: int) -> tuple[str, subprocess.Popen[bytes], str]:
    """Start a named server; returns (label, process, model name to send)."""
    name, _, arg = spec.partition("=")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if name in ("baton-disaggregated", "baton-colocated"):
        mode = name.split("-")[1]
        cmd = [
            str(Path(sys.executable).parent / "baton"),
            "serve",
            "--mode",
            mode,
            "--http-port",
            str(port),
            "--grpc-port",
            str(port + 1),
        ]
        if arg:
            cmd += ["--config", arg]
        label = f"{name}:{Path(arg).stem}" if arg else name  # two configs of one mode apart
        return (
            label,
            subprocess.Popen(cmd, env=env, start_new_session=True),
            "smollm2-135m-instruct",
        )
    if name == "llama-server":
        cmd = [
            arg,
            "-m",
            str(default_model_path()),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "-t",
            str(threads),
            "-np",
            "4",
            "-c",
            "8192",
        ]
        return (
            name,
            subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            ),
            "default",
        )
    raise SystemExit(
        f"unknown server {name!r}: baton-disaggregated, baton-colocated, llama-server=PATH"
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(2)  # SIGINT: baton serve shuts Ray down cleanly
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def workloads(args: argparse.Namespace) -> list[tuple[str, list[str], int]]:
    tokenizer = load_checkpoint(default_model_path()).tokenizer
    rng = random.Random(args.seed)
    n = args.requests
    out = []
    if "random" in args.workloads:
        prompts = [make_text(tokenizer, args.prompt_tokens, rng) for _ in range(n)]
        out.append(("random", prompts, args.output_tokens))
    if "shared-prefix" in args.workloads:
        system = make_text(tokenizer, args.system_tokens, rng)
        questions = [make_text(tokenizer, args.question_tokens, rng) for _ in range(n)]
        out.append(("shared-prefix", [f"{system}\n{q}" for q in questions], args.shared_output))
    return out


def bench_server(
    label: str,
    url: str,
    model: str,
    args: argparse.Namespace,
    loads: list[tuple[str, list[str], int]],
) -> list[Run]:
    runs = []
    warm = loads[0][1][:2]
    asyncio.run(run_closed_loop(url, model, warm, 4, 2))  # warm up (lazy init, caches)
    for workload, prompts, max_tokens in loads:
        if workload == "shared-prefix":
            results, wall = asyncio.run(
                run_closed_loop(url, model, prompts, max_tokens, args.shared_concurrency)
            )
            runs.append(Run(label, workload, f"c={args.shared_concurrency}", wall, results))
            continue
        for c in args.concurrency:
            results, wall = asyncio.run(run_closed_loop(url, model, prompts, max_tokens, c))
            runs.append(Run(label, workload, f"c={c}", wall, results))
        for rate in args.rate:
            results, wall = asyncio.run(
                run_open_loop(url, model, prompts, max_tokens, rate, args.seed)
            )
            runs.append(Run(label, workload, f"rate={rate:g}", wall, results))
    return runs


def plot(rows: list[tuple[Run, dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label in dict.fromkeys(r.label for r, _ in rows):
        pts = [(r.load, s) for r, s in rows if r.label == label and r.workload == "random"]
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1]["out_tok_s"] for p in pts], marker="o", label=label)
        axes[1].plot(xs, [p[1]["ttft_p50"] for p in pts], marker="o", label=label)
        axes[2].plot(xs, [p[1]["itl_p50"] for p in pts], marker="o", label=label)
    for ax, title in zip(axes, ("output tokens/s", "TTFT p50 (ms)", "ITL p50 (ms)"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("load")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--url", help="an endpoint already serving (with --label, --model)")
    ap.add_argument("--label", default="endpoint")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--launch", nargs="*", default=[], help="servers to start in turn")
    ap.add_argument("--port", type=int, default=8100)
    ap.add_argument("--threads", type=int, default=2, help="llama-server -t")
    ap.add_argument("--workloads", nargs="+", default=["random", "shared-prefix"])
    ap.add_argument("--concurrency", type=int, nargs="*", default=[1, 4, 8])
    ap.add_argument("--rate", type=float, nargs="*", default=[], help="Poisson request rates")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=200)
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--system-tokens", type=int, default=400)
    ap.add_argument("--question-tokens", type=int, default=24)
    ap.add_argument("--shared-output", type=int, default=16)
    ap.add_argument("--shared-concurrency", type=int, default=1)
    ap.add_argument("--ttft-slo-ms", type=float, default=1000)
    ap.add_argument("--itl-slo-ms", type=float, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=Path("bench/serve.png"))
    args = ap.parse_args()
    loads = workloads(args)
    runs: list[Run] = []
    if args.url:
        wait_ready(args.url, None, 30)
        runs += bench_server(args.label, args.url, args.model, args, loads)
    for spec in args.launch:
        label, proc, model = launch(spec, args.port, args.threads)
        url = f"http://127.0.0.1:{args.port}"
        try:
            wait_ready(url, proc)
            runs += bench_server(label, url, model, args, loads)
        finally:
            stop(proc)
    rows = [(r, summarize(r, args.ttft_slo_ms / 1e3, args.itl_slo_ms / 1e3)) for r in runs]
    cpu = os.cpu_count()
    print(f"\n{len(runs)} runs on {cpu} CPUs; {args.requests} requests each; ms and per second")
    head = (
        "server",
        "workload",
        "load",
        "fail",
        "req/s",
        "out tok/s",
        "TTFT p50/p90/p99",
        "ITL p50/p90/p99",
        "e2e p50/p90/p99",
        "goodput",
    )
    print(
        f"{head[0]:20s}{head[1]:15s}{head[2]:9s}{head[3]:>5s}{head[4]:>7s}{head[5]:>10s}"
        f"{head[6]:>20s}{head[7]:>18s}{head[8]:>22s}{head[9]:>9s}"
    )
    for run, s in rows:
        print(
            f"{run.label:20s}{run.workload:15s}{run.load:9s}{s['failed']:5.0f}"
            f"{s['req_s']:7.2f}{s['out_tok_s']:10.1f}"
            f"{s['ttft_p50']:8.0f}/{s['ttft_p90']:.0f}/{s['ttft_p99']:.0f}".ljust(20)
            + f"{s['itl_p50']:9.1f}/{s['itl_p90']:.1f}/{s['itl_p99']:.1f}".ljust(18)
            + f"{s['e2e_p50']:11.0f}/{s['e2e_p90']:.0f}/{s['e2e_p99']:.0f}".ljust(22)
            + f"{s['goodput']:9.2f}"
        )
    errors = {r.error for run in runs for r in run.results if not r.ok}
    if errors:
        print("errors:", *sorted(errors)[:5], sep="\n  ")
    plot(rows, args.plot)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
