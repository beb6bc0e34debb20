"""`baton serve` as a user runs it: local Ray, a KV store shard, FP8 prefill and INT4 decode
pools, the OpenAI HTTP API and gRPC, driven by the official `openai` client.

One server for the module (start-up is most of the cost on 2 cores), in fp32 with
batch-invariant pools so every request's tokens can be compared exactly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import psutil
import pytest
import torch
import yaml

from engine.disaggregated import InProcessDisaggregation
from engine.engine_args import EngineArgs
from engine.loaders import LoadedCheckpoint
from engine.sampling_params import SamplingParams
from tests.ports import free_port

pytestmark = pytest.mark.slow

SYSTEM = (
    "You are a meticulous assistant for the public library of a small coastal town. You "
    "answer questions about opening hours, borrowing rules, reading rooms and weekend "
    "events, briefly and politely, and you never invent a rule the library does not have."
)
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Explain photosynthesis in simple terms.",
    "1, 1, 2, 3, 5, 8,",
    "The meaning of life is",
    "Translate to French: Good morning, how are you?",
    "List three primary colors:",
]
POOL = {"kv_cache_bytes": 64 * 2**20, "batch_invariant": True}


class Server:
    def __init__(self, proc: subprocess.Popen[str], config: dict, log: Path) -> None:
        self.proc = proc
        self.config = config
        self.log = log
        self.http = f"http://127.0.0.1:{config['router']['http_port']}"
        self.grpc = f"127.0.0.1:{config['router']['grpc_port']}"

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"{self.http}/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    config = {
        "model": {"max_model_len": 1024, "dtype": "float32"},
        # A step budget that takes all 16 concurrent prompts whole: split across steps, a
        # prompt's attention runs in other blocks (another summation order), so outputs
        # would match their solo runs only to fp32 rounding, not token for token.
        # One torch thread per replica, as the in-process reference below runs: torch's
        # single-query attention splits keys across threads, so fp32 sums would differ.
        "prefill": {
            "replicas": 1,
            "linear": "fp8",
            "max_num_batched_tokens": 4096,
            "torch_threads": 1,
            **POOL,
        },
        "decode": {"replicas": 2, "linear": "int4", "torch_threads": 1, **POOL},  # one may die
        # A starved runner must not turn a slow KV pull into a recompute on decode either
        # (INT4 instead of FP8 prompt KV: other tokens than the solo run's).
        "kvstore": {
            "targets": [f"127.0.0.1:{free_port()}"],
            "capacity": "256MiB",
            "timeout_s": 120,
        },
        # Every prompt takes the remote prefill path, however short, so outputs compare
        # with the in-process FP8-prefill/INT4-decode pipeline.
        "router": {
            "http_port": free_port(),
            "grpc_port": free_port(),
            "local_prefill_threshold": 0,
            # A starved 2-core runner must not turn the remote path into a fallback.
            "prefill_timeout_s": 120,
        },
    }
    (tmp / "serving.yaml").write_text(yaml.safe_dump(config))
    log = tmp / "serve.log"
    baton = str(Path(sys.executable).parent / "baton")
    proc = subprocess.Popen(
        [baton, "serve", "--config", str(tmp / "serving.yaml")],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    srv = Server(proc, config, log)
    deadline = time.monotonic() + 420
    while "Ctrl-C stops everything" not in log.read_text():
        assert proc.poll() is None, f"baton serve exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"baton serve not ready:\n{log.read_text()[-3000:]}"
        time.sleep(1)
    yield srv
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key="unused", max_retries=0)


def test_prints_its_urls(server: Server) -> None:
    text = server.log.read_text()
    assert f"OpenAI HTTP  {server.http}/v1" in text
    assert f"gRPC         {server.grpc}" in text


def test_chat_and_completions_with_exact_usage(
    client: openai.OpenAI, default_checkpoint: LoadedCheckpoint
) -> None:
    tok = default_checkpoint.tokenizer
    chat = client.chat.completions.create(
        model="smollm2-135m-instruct",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in (chat.choices[0].message.content or "")
    assert chat.usage is not None and chat.usage.completion_tokens >= 1
    chat_prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    assert chat.usage.prompt_tokens == len(chat_prompt)
    assert chat.usage.total_tokens == len(chat_prompt) + chat.usage.completion_tokens
    comp = client.completions.create(
        model="smollm2-135m-instruct", prompt="1, 2, 3, 4,", max_tokens=6, temperature=0
    )
    assert comp.usage is not None
    n_prompt = len(tok.encode("1, 2, 3, 4,"))
    assert comp.usage.prompt_tokens == n_prompt and comp.usage.completion_tokens == 6
    assert comp.usage.total_tokens == n_prompt + 6 and comp.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model="smollm2-135m-instruct",
            prompt="1, 2, 3, 4,",
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == comp.choices[0].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


def test_stop_n_and_seed(client: openai.OpenAI) -> None:
    base = client.completions.create(
        model="smollm2-135m-instruct", prompt=PROMPTS[2], max_tokens=24, temperature=0
    )
    stop = base.choices[0].text.split()[3]
    cut = client.completions.create(
        model="smollm2-135m-instruct",
        prompt=PROMPTS[2],
        max_tokens=24,
        temperature=0,
        stop=[stop],
    )
    assert cut.choices[0].text == base.choices[0].text[: base.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    kwargs = dict(
        model="smollm2-135m-instruct",
        prompt=PROMPTS[0],
        max_tokens=12,
        temperature=1.0,
        n=3,
        seed=42,
    )
    a = client.completions.create(**kwargs)  # type: ignore[call-overload]
    b = client.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1 and sorted(c.index for c in a.choices) == [0, 1, 2]


def test_matches_the_in_process_pipeline(
    server: Server,
    client: openai.OpenAI,
    default_checkpoint: LoadedCheckpoint,
    request: pytest.FixtureRequest,
) -> None:
    def engine(linear: str, lm_head: str):  # type: ignore[no-untyped-def]
        return EngineArgs(
            dtype="float32", linear=linear, lm_head_linear=lm_head, max_model_len=1024, **POOL
        ).create_engine(default_checkpoint)

    # The pools' LM heads as `baton serve` builds them on a CPU (services.serving_config).
    local = InProcessDisaggregation(engine("fp8", "dense"), engine("int4", "int8"))
    params = SamplingParams(max_tokens=24, min_tokens=24, temperature=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replicas' count (server fixture)
    request.addfinalizer(lambda: torch.set_num_threads(threads))
    tok = local.decode_engine.tokenizer
    # Long enough for several full blocks to travel through the KV store; the shared
    # opening makes later prompts reuse cached blocks, in the same order on both sides.
    for text in (f"{SYSTEM}\n{p}" for p in PROMPTS[:4]):
        want = local.generate([tok.encode(text)], params)[0]
        got = client.completions.create(
            model="smollm2-135m-instruct",
            prompt=text,
            max_tokens=24,
            temperature=0,
            extra_body={"min_tokens": 24, "cache_salt": "parity"},
        )
        assert got.choices[0].text == want.text, text
    time.sleep(2.5)  # one metrics refresh
    metrics = server.metrics()
    moved = (
        'baton_kv_transfer_bytes_total{pool="decode",model="smollm2-135m-instruct",direction="get"}'
    )
    assert metrics[moved] > 0, "decode never pulled KV from the store"
    fallbacks = {k: v for k, v in metrics.items() if "fallback" in k and v}
    assert not fallbacks, fallbacks


def test_repeated_system_prompt_is_served_from_the_cache(
    server: Server, client: openai.OpenAI, default_checkpoint: LoadedCheckpoint
) -> None:
    questions = ("When do you open on Saturdays?", "Can I renew a book by phone?")
    tok = default_checkpoint.tokenizer
    first, second_ids = (
        tok.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        for q in questions
    )
    common = next(i for i, (a, b) in enumerate(zip(first, second_ids, strict=False)) if a != b)
    shared_blocks = common // 16
    assert shared_blocks >= 3

    def ask(question: str) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model="smollm2-135m-instruct",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
            max_tokens=4,
            temperature=0,
        )

    ask(questions[0])
    time.sleep(2.5)  # /metrics reflects the pools as of its last refresh (1 s period)
    before = server.metrics()
    second = ask(questions[1])
    time.sleep(2.5)
    after = server.metrics()
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens or 0
    assert cached >= 16 * shared_blocks and cached % 16 == 0

    def delta(name: str) -> float:
        key = f'{name}{{pool="prefill",model="smollm2-135m-instruct"}}'
        return after[key] - before[key]

    # Prompt tokens count what the worker computed; the cached ones are its hits.
    assert delta("baton_prompt_tokens_total") == second.usage.prompt_tokens - cached
    assert delta("baton_prefix_cache_hit_tokens_total") == cached
    assert delta("baton_prefix_cache_queried_tokens_total") == second.usage.prompt_tokens


def test_concurrent_streams_equal_their_solo_runs(server: Server, client: openai.OpenAI) -> None:
    # Distinct from the first token, so no request shares cached blocks with another.
    prompts = [f"[{i}] {SYSTEM}\nQuestion: {p}" for i, p in enumerate(PROMPTS[:6])]

    def run(prompt: str, salt: str) -> str:
        stream = client.completions.create(
            model="smollm2-135m-instruct",
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            stream=True,
            extra_body={"cache_salt": salt},
        )
        return "".join(c.choices[0].text for c in stream if c.choices)

    # Each phase starts cache-cold (its own salt): the same arithmetic, batched or not.
    solo = [run(p, "solo") for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(run, prompts, ["together"] * len(prompts)))
    if together != solo:  # say whether a fallback (a recompute on decode) explains it
        time.sleep(2.5)  # one metrics refresh
        fallbacks = {k: v for k, v in server.metrics().items() if "fallback" in k and v}
        assert together == solo, f"fallbacks so far: {fallbacks}"


def stream_text(
    client: openai.OpenAI,
    prompt: str,
    salt: str,
    started: threading.Event | None = None,
    tokens: int = 48,
) -> tuple[str, str | None]:
    """A greedy `tokens`-token stream's text and finish reason; `started` is set at its
    first chunk."""
    stream = client.completions.create(
        model="smollm2-135m-instruct",
        prompt=prompt,
        max_tokens=tokens,
        temperature=0,
        stream=True,
        extra_body={"cache_salt": salt, "min_tokens": tokens},
    )
    text, finish = "", None
    for chunk in stream:
        text += "".join(c.text for c in chunk.choices)
        finish = next((c.finish_reason for c in chunk.choices if c.finish_reason), finish)
        if started is not None:
            started.set()
    return text, finish


def solo_runs(
    client: openai.OpenAI, prompts: list[str], tokens: int = 48
) -> list[tuple[str, str | None]]:
    """Each prompt's uninterrupted stream, the reference a disturbed run must equal. They
    run together: the pools are batch-invariant, so company changes no token (what
    test_concurrent_streams_equal_their_solo_runs checks)."""
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        runs = [pool.submit(stream_text, client, p, "solo", None, tokens) for p in prompts]
        return [r.result(timeout=300) for r in runs]


MIGRATIONS = 'baton_request_migrations_total{pool="decode",model="smollm2-135m-instruct"}'


def decode_replicas(server: Server) -> list[psutil.Process]:
    return [
        p
        for p in psutil.Process(server.proc.pid).children(recursive=True)
        if "ServeReplica:baton:decode" in " ".join(p.cmdline())
    ]


KILLED_STREAM_TOKENS = 240
"""Long enough that both streams still run when the kill lands, ~4 s after the first
starts: 48 tokens finished before it on a fast VM, and nothing was left to migrate."""


def test_a_killed_decode_replica_loses_no_token(server: Server, client: openai.OpenAI) -> None:
    before = server.metrics()[MIGRATIONS]
    prompts = [f"{SYSTEM}\nQuestion: {p}" for p in PROMPTS[2:4]]
    n = KILLED_STREAM_TOKENS
    solo = solo_runs(client, prompts, tokens=n)
    started = [threading.Event(), threading.Event()]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(stream_text, client, prompts[0], "killed", started[0], n)
        assert started[0].wait(120)
        time.sleep(2.5)  # the replicas' routing stats now show where the first one runs
        second = pool.submit(stream_text, client, prompts[1], "killed", started[1], n)
        assert started[1].wait(120)
        replicas = decode_replicas(server)
        assert len(replicas) == 2
        busy = [sum(p.cpu_times()[:2]) for p in replicas]
        time.sleep(1)
        busy = [sum(p.cpu_times()[:2]) - b for p, b in zip(replicas, busy, strict=True)]
        replicas[busy.index(max(busy))].kill()  # SIGKILL: no goodbye, mid-stream
        together = [first.result(timeout=300), second.result(timeout=300)]
    assert together == solo  # every token once, and the same continuation
    time.sleep(2.5)
    assert server.metrics()[MIGRATIONS] - before >= 1


def test_scale_down_drains_the_replica_it_removes(server: Server, client: openai.OpenAI) -> None:
    deadline = time.monotonic() + 180  # Ray restarts the replica the last test killed
    while _running_decode_replicas() < 2:
        assert time.monotonic() < deadline, "the decode pool did not return to 2 replicas"
        time.sleep(2)
    before = server.metrics()[MIGRATIONS]
    prompts = [f"{SYSTEM}\nQuestion: {p}" for p in PROMPTS[4:8]]
    solo = solo_runs(client, prompts)
    started = [threading.Event() for _ in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        runs = []
        for wave in (0, 2):  # the second wave sees the first's load and takes the other replica
            runs += [
                pool.submit(stream_text, client, prompts[i], "drained", started[i])
                for i in (wave, wave + 1)
            ]
            assert all(started[i].wait(120) for i in (wave, wave + 1))
            time.sleep(2.5 if wave == 0 else 0)
        _scale_decode(1)  # while every stream is mid-way, on both replicas
        together = [r.result(timeout=300) for r in runs]
    assert together == solo  # nothing dropped, nothing cut short
    time.sleep(2.5)
    assert server.metrics()[MIGRATIONS] == before  # drained, not migrated
    assert len(decode_replicas(server)) == 1


def _ray_env() -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled"}


def _running_decode_replicas() -> int:
    return int(_on_the_cluster("print(ServeReplicas('baton').running('decode'))"))


def _scale_decode(replicas: int) -> None:
    """What the operator or the local autoscaler does: set the decode pool's size."""
    _on_the_cluster(f"ServeReplicas('baton').scale('decode', {replicas})")


def _on_the_cluster(statement: str) -> str:
    """Runs `statement` in a driver attached to baton serve's Ray cluster; its stdout."""
    code = (
        "import ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False)\n"
        "from baton.local_autoscaler import ServeReplicas\n" + statement
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_ray_env(), timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def test_sigterm_drains_then_stops_every_process(server: Server, client: openai.OpenAI) -> None:
    children = psutil.Process(server.proc.pid).children(recursive=True)
    assert children, "baton serve should have started Ray and a KV store shard"
    started = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        # Long enough to be still streaming when the refused request below arrives.
        prompt = f"{SYSTEM}\n{PROMPTS[0]}"
        running = pool.submit(stream_text, client, prompt, "term", started, 400)
        assert started.wait(120)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(2)  # the router is draining: the stream goes on, new requests are refused
        with pytest.raises(openai.APIStatusError) as refused:
            client.completions.create(model="smollm2-135m-instruct", prompt="Hi", max_tokens=2)
        assert refused.value.status_code == 503
        text, finish = running.result(timeout=300)
    assert finish == "length" and text
    assert server.proc.wait(timeout=120) == 0
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert re.search(r"shutting down", server.log.read_text())


def _small_config(path: Path) -> None:
    """A serving.yaml of small pools on free ports, for a `baton serve` that never serves."""
    small = {"kv_cache_bytes": 64 * 2**20, "torch_threads": 1}
    config = {
        "prefill": small,
        "decode": small,
        "kvstore": {"targets": [f"127.0.0.1:{free_port()}"], "capacity": "64MiB"},
        "router": {"http_port": free_port(), "grpc_port": free_port()},
    }
    path.write_text(yaml.safe_dump(config))


def test_replicas_that_cannot_load_the_model_end_serve_with_their_error(
    tmp_path: Path, default_gguf: Path
) -> None:
    """The file exists, so `baton serve` starts Ray; the replicas find it cut off. It exits
    with their error, without draining an application that never came up."""
    model = tmp_path / "cut.gguf"
    with default_gguf.open("rb") as f:
        model.write_bytes(f.read(50_000_000))  # the header whole, the last tensors cut off
    _small_config(tmp_path / "serving.yaml")
    baton = str(Path(sys.executable).parent / "baton")
    done = subprocess.run(
        [baton, "serve", "--config", str(tmp_path / "serving.yaml"), "--model", str(model)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert re.search(
        rf"baton: error: (decode|prefill): ValueError: {re.escape(str(model))} is truncated "
        r"or corrupt \(tensor '.+' runs past its end\)",
        out,
    ), out[-3000:]
    assert "Traceback" not in out and "no drain" not in out, out[-3000:]


SESSION_ENV = "BATON_TEST_SESSION"
"""Set, to a value of its own, in the environment of the `baton serve` a test starts:
every process it starts inherits it (Ray hands its environment down to the raylet and
the workers), and no one else's process has that value."""


def _session_processes(session: str) -> dict[psutil.Process, str]:
    """The processes of `session`, each with its command line."""
    found = {}
    for p in psutil.process_iter():
        try:
            if p.environ().get(SESSION_ENV) == session:
                found[p] = " ".join(p.cmdline())
        except psutil.Error:  # exited meanwhile, or not readable: not this session's
            pass
    return found


@pytest.mark.parametrize(
    ("signum", "stage"),
    [
        (signal.SIGINT, "raylet/raylet"),  # Ctrl-C while ray.init waits for its raylet
        (signal.SIGTERM, "raylet/raylet"),  # ray.init's own SIGTERM handler is in place
        (signal.SIGTERM, "ServeReplica:baton:"),  # Kubernetes stops a pod still loading
    ],
    ids=["sigint-in-ray-init", "sigterm-in-ray-init", "sigterm-while-replicas-load"],
)
def test_a_signal_during_start_up_stops_it_and_leaves_no_process(
    tmp_path: Path, signum: signal.Signals, stage: str
) -> None:
    """Start-up ends where the signal finds it (it used to go on to serve, then stop, or
    a Ctrl-C in ray.init ended with a traceback) and everything it started stops."""
    _small_config(tmp_path / "serving.yaml")
    log = tmp_path / "serve.log"
    session = f"{os.getpid()}-{time.time_ns()}"
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "baton"),
            "serve",
            "--config",
            str(tmp_path / "serving.yaml"),
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", SESSION_ENV: session},
    )
    try:
        deadline = time.monotonic() + 300
        while not any(stage in command for command in _session_processes(session).values()):
            assert proc.poll() is None, f"baton serve exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no {stage} process:\n{log.read_text()[-3000:]}"
            time.sleep(0.05)
        proc.send_signal(signum)
        returncode = proc.wait(timeout=300)
        out = log.read_text()
        assert returncode == 0, out[-3000:]
        assert "baton: interrupted while starting" in out, out[-3000:]
        assert "Baton is serving" not in out and "Traceback" not in out, out[-3000:]
        left = _session_processes(session)
        _, alive = psutil.wait_procs(list(left), timeout=30)
        assert not alive, [left[p] for p in alive]
    finally:
        for p in _session_processes(session):  # a failed run's leftovers, and only those
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
