"""`baton serve`: the whole platform on one machine.

Starts a KV store shard (disaggregated mode), local Ray, and the Serve application on
HTTP and gRPC; prints the URLs; with `--policy`, sizes the pools to CapacityPolicies
(baton.local_autoscaler). The shard requires a token (the configured one, else
BATON_KVSTORE_TOKEN, else a random one made for this run) that only the pools are given.
On Ctrl-C or SIGTERM it drains (requests in flight finish
within router.drain_timeout_s, new ones get 503), then stops everything it started and
exits 0; a second Ctrl-C stops at once. Either signal during start-up (Kubernetes stopping
a pod that is still starting) stops start-up where it is, with the same clean-up and
status.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from engine.loaders import checkpoint_source
from operators.policy_spec import describe, load_policy_file
from operators.pool_policy import Pool, PoolPolicy
from services.kvstore.security import TOKEN_ENV
from services.serving_config import ServingConfig

READY_TIMEOUT_S = 300.0
APP = "baton"
PR_SET_PDEATHSIG = 1

T = TypeVar("T")


RUN_ENV = "BATON_SERVE_RUN"
"""Set to a fresh id by each `run`; every process it starts inherits it, Ray's included."""


def reap_run(run_id: str, exempt: set[int], rounds: int = 5) -> int:
    """Stops every process (but `exempt`) that inherited `run_id`: Ray's agents outlive a
    `ray.init` cut short until they notice their raylet is gone (about a minute). A process
    still starting may start others while it is stopped, so this looks again until a look
    finds none (at most `rounds` looks). Returns how many it stopped."""
    import psutil

    stopped = 0
    for _ in range(rounds):
        mine = []
        for proc in psutil.process_iter():
            try:
                if proc.pid not in exempt and proc.environ().get(RUN_ENV) == run_id:
                    mine.append(proc)
            except psutil.Error:  # exited meanwhile, or another user's: not this run's
                pass
        if not mine:
            break
        for proc in mine:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(mine, timeout=5)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        stopped += len(mine)
    return stopped


class StartupInterrupted(BaseException):
    """SIGINT or SIGTERM arrived while `baton serve` was starting. A BaseException, as
    KeyboardInterrupt is: what it interrupts (Ray, Serve) must not catch it as an error."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="serving.yaml (see services/serving_config.py)")
    p.add_argument("--mode", choices=["disaggregated", "colocated"], default=None)
    p.add_argument("--model", default=None, help="GGUF file or HF folder")
    p.add_argument("--http-port", type=int, default=None)
    p.add_argument("--grpc-port", type=int, default=None)
    p.add_argument(
        "--policy",
        type=Path,
        default=None,
        help="CapacityPolicy YAML (docs/capacitypolicy.md): scale the prefill/decode pools",
    )
    p.add_argument(
        "--policy-interval",
        type=_positive_seconds,
        default=15.0,
        help="seconds between two autoscaling decisions (default 15)",
    )


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:  # also NaN: 0 or less would decide in a tight loop
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text}")
    return value


def read_user_file(path: Path, read: Callable[[Path], T]) -> T:
    """`read(path)`, with a file that cannot be read, is not YAML or holds settings out of
    bounds as one ValueError line naming it."""
    try:
        return read(path)
    except ValidationError as e:
        raise ValueError(f"{path}: {describe(e, root='')}") from None
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not YAML: it is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"{path} is not valid YAML{where}: {problem}") from None


def load_config(args: argparse.Namespace) -> ServingConfig:
    """The config file with the command line's overrides; refuses a model path that is not
    there before anything starts (replicas would find out only once Ray has started)."""
    config = (
        read_user_file(args.config, ServingConfig.from_yaml) if args.config else ServingConfig()
    )
    data = config.model_dump()
    if args.mode:
        data["mode"] = args.mode
    if args.model:
        data["model"]["path"] = args.model
    if args.http_port is not None:
        data["router"]["http_port"] = args.http_port
    if args.grpc_port is not None:
        data["router"]["grpc_port"] = args.grpc_port
    share_cpus(data)
    config = ServingConfig.model_validate(data)
    checkpoint_source(config.model.path)
    return config


def share_cpus(data: dict[str, Any], cpus: int | None = None) -> None:
    """Threads for the pools that leave `torch_threads` unset, from this machine's `cpus`.
    Left at torch's default every replica would start a thread per core, and every
    parallel region would wait for threads the others preempted.

    A prefill replica gets an equal share of the cores among all replicas. A decode replica
    gets an equal share among the decode replicas only, overlapping the prefill pool's:
    its steps hold every running stream's next token, and on a shared-prefix prompt (whose
    short rest decode prefills itself) or between remote prefills the cores would
    otherwise idle. Measured on the 2-core VM (bench.serve against fresh disaggregated
    servers, two alternating rounds; section "Serving on CPU" of bench/RESULTS.md): decode
    2 threads and prefill 1 against 1 and 1 gave c=8 86.0 / 81.3 against 69.5 / 71.8
    output tok/s and shared-prefix TTFT p50 161 / 176 against 238 / 236 ms."""
    cpus = cpus or len(os.sched_getaffinity(0))
    disaggregated = data["mode"] == "disaggregated"
    decode = max(1, data["decode"]["replicas"])
    replicas = decode + (max(1, data["prefill"]["replicas"]) if disaggregated else 0)
    shares = {"decode": max(1, cpus // decode), "prefill": max(1, cpus // replicas)}
    for pool in ["decode", "prefill"] if disaggregated else ["decode"]:
        if data[pool]["torch_threads"] is None:
            data[pool]["torch_threads"] = shares[pool]


def with_kvstore_token(config: ServingConfig) -> ServingConfig:
    """`config` with the token the local shard will require in `kvstore.token`: the one
    configured (inline, in token_file or in BATON_KVSTORE_TOKEN), else a new random one."""
    kv = config.kvstore
    token = kv.client_security().token or secrets.token_urlsafe(32)
    return config.model_copy(
        update={"kvstore": kv.model_copy(update={"token": token, "token_file": None})}
    )


def start_kvstore(config: ServingConfig) -> subprocess.Popen[bytes]:
    """The local shard, listening on the first kvstore target, requiring kvstore.token
    (passed in its environment: a command line is visible to every user)."""
    host, _, port = config.kvstore.targets[0].rpartition(":")
    cmd = [
        sys.executable,
        "-m",
        "services.kvstore.main",
        "--host",
        host,
        "--port",
        port,
        "--capacity",
        config.kvstore.capacity,
        "--shard-id",
        "local-0",
    ]
    if config.kvstore.redis_url:
        cmd += ["--redis-url", config.kvstore.redis_url]
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    if config.kvstore.token is not None:
        env[TOKEN_ENV] = config.kvstore.token
    return subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)


def die_with_parent() -> None:
    # Linux: the shard gets SIGTERM if `baton serve` dies without cleaning up (SIGKILL).
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_http_ready(url: str, deadline: float, children: list[subprocess.Popen[bytes]]) -> None:
    while time.monotonic() < deadline:
        for child in children:
            if child.poll() is not None:
                raise RuntimeError(f"the KV store shard exited with {child.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become ready in {READY_TIMEOUT_S:.0f} s")


def load_policies(path: Path, config: ServingConfig) -> dict[Pool, PoolPolicy]:
    """The policy file's pools, each of which this config must serve."""
    policies = read_user_file(path, load_policy_file)
    if Pool.PREFILL in policies and config.mode == "colocated":
        raise ValueError(f"{path}: a policy sizes the prefill pool, but colocated mode has none")
    return policies


def run(
    config: ServingConfig,
    policies: Mapping[Pool, PoolPolicy] | None = None,
    interval_s: float = 15.0,
) -> int:
    import ray
    from ray import serve

    from services.app import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # On a busy laptop a replica can take longer than Ray's 0.1 s default to report its
    # queue length; routing then retries in a loop instead of sending the request.
    os.environ.setdefault("RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "1.0")
    os.environ.setdefault("RAY_SERVE_MAX_QUEUE_LENGTH_RESPONSE_DEADLINE_S", "5.0")
    run_id = os.environ[RUN_ENV] = secrets.token_hex(8)
    children: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    starting = True

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # a second Ctrl-C: stop now, requests in flight or not
            raise KeyboardInterrupt
        stop.set()
        if starting:  # nothing to drain yet: cut start-up short wherever it is
            raise StartupInterrupted

    r = config.router
    ray_init_called = False  # cut short or not, it may have started Ray's processes
    deployed = False  # only an application that came up has requests to drain
    # Before anything starts: whatever a signal interrupts, the clean-up below stops.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if config.mode == "disaggregated":
            config = with_kvstore_token(config)
            children.append(start_kvstore(config))
        ray_init_called = True
        try:
            ray.init(
                include_dashboard=False,
                object_store_memory=128 * 2**20,
                namespace="baton",
                logging_level=logging.WARNING,
                log_to_driver=False,
            )
        except SystemExit as e:  # the SIGTERM handler ray.init installs exits at once
            if e.code != signal.SIGTERM:
                raise
            stop.set()
            raise StartupInterrupted from None
        signal.signal(signal.SIGTERM, on_signal)  # in place of ray.init's
        serve.start(http_options={"host": r.host, "port": r.http_port})
        try:
            serve.run(
                build_app(config),
                name=APP,
                route_prefix="/",
                blocking=False,
                # Baton sizes its pools from outside Serve (CapacityPolicies, the local
                # autoscaler, an operator by hand); Serve's own autoscaling is never used.
                external_scaler_enabled=True,
            )
        except RuntimeError as e:  # Serve gave up on replicas that failed to start
            print(f"baton: error: {deploy_failure(e)}", file=sys.stderr, flush=True)
            return 1
        deployed = True
        base = f"http://{r.host}:{r.http_port}"
        try:
            wait_http_ready(f"{base}/health", time.monotonic() + READY_TIMEOUT_S, children)
        except (RuntimeError, TimeoutError) as e:  # the shard died, or HTTP never answered
            print(f"baton: error: {e}", file=sys.stderr, flush=True)
            return 1
        if policies:
            start_autoscaler(config, policies, f"{base}/metrics", interval_s, stop)
        print(f"Baton is serving {config.model.served_name} ({config.mode})", flush=True)
        print(f"  OpenAI HTTP  {base}/v1", flush=True)
        print(f"  gRPC         {r.host}:{r.grpc_port}  (baton.v1.Inference)", flush=True)
        print(f"  metrics      {base}/metrics", flush=True)
        if policies:
            pools = ", ".join(sorted(policies))
            print(f"  autoscaling  {pools} every {interval_s:g} s", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        starting = False
        started = [time.monotonic()] * len(children)
        quick_exits = 0  # a shard that cannot stay up (port taken, bad Redis URL) ends this
        while not stop.is_set():
            for i, child in enumerate(children):
                if child.poll() is None:
                    continue
                quick_exits = quick_exits + 1 if time.monotonic() - started[i] < 10 else 1
                if quick_exits > 3:
                    print("baton: the KV store shard keeps exiting; stopping", file=sys.stderr)
                    return 1
                # Its blocks are gone with it: requests miss the cache, they do not fail.
                print(
                    f"baton: the KV store shard exited ({child.returncode}); restarting it",
                    file=sys.stderr,
                    flush=True,
                )
                children[i], started[i] = start_kvstore(config), time.monotonic()
            stop.wait(1.0)
        return 0
    except StartupInterrupted:
        print("baton: interrupted while starting", file=sys.stderr, flush=True)
        return 0  # as when stopped after start-up: it stopped because it was told to
    finally:
        starting = False  # only a second signal cuts the clean-up short
        print("baton: shutting down", file=sys.stderr, flush=True)
        try:
            if ray.is_initialized():
                if deployed:
                    drain(r.drain_timeout_s)
                serve.shutdown()
            if ray_init_called:
                # Also after a ray.init cut short: this stops the processes it recorded;
                # those it did not record yet, reap_run stops below.
                ray.shutdown()
        finally:
            for child in children:
                child.terminate()
            for child in children:
                try:
                    child.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    child.kill()
            if ray_init_called:  # after the shard: its stop never waits on this one
                reap_run(run_id, exempt={os.getpid(), *(c.pid for c in children)})


def deploy_failure(error: RuntimeError) -> str:
    """Why the application did not deploy: the last line of each failed deployment's
    status message (its replicas' exception), else what Serve raised."""
    from ray import serve

    try:
        deployments = serve.status().applications[APP].deployments
    except Exception:  # Serve itself is gone: what it raised is all there is
        return str(error)
    causes = [
        f"{name}: {d.message.strip().splitlines()[-1]}"
        for name, d in sorted(deployments.items())
        if d.status == "DEPLOY_FAILED" and d.message.strip()
    ]
    return "; ".join(causes) or str(error)


def drain(timeout_s: float) -> None:
    """Lets the requests in flight finish (up to `timeout_s`) while new ones get 503."""
    from ray import serve

    try:
        router = serve.get_deployment_handle("router", APP)
        cut = router.drain.remote(timeout_s).result(timeout_s=timeout_s + 10)
    except Exception as e:  # not started, or already gone: nothing to wait for
        print(f"baton: no drain ({type(e).__name__})", file=sys.stderr, flush=True)
        return
    if cut:
        print(f"baton: {cut} requests did not finish within {timeout_s:g} s", file=sys.stderr)


def start_autoscaler(
    config: ServingConfig,
    policies: Mapping[Pool, PoolPolicy],
    metrics_url: str,
    interval_s: float,
    stop: threading.Event,
) -> threading.Thread:
    from baton.local_autoscaler import LocalAutoscaler, ServeReplicas

    sizes = {Pool.PREFILL: config.prefill.replicas, Pool.DECODE: config.decode.replicas}
    autoscaler = LocalAutoscaler(
        policies,
        metrics_url,
        config.model.served_name,
        ServeReplicas(APP),
        {pool: sizes[pool] for pool in policies},
        interval_s,
        report=lambda line: print(line, flush=True),
    )
    thread = threading.Thread(target=autoscaler.run, args=(stop,), name="autoscaler", daemon=True)
    thread.start()
    return thread
