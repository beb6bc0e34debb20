"""API keys over both protocols, the rule that keeps a router off the network without
them, and tenants: each key's requests get a prefix cache of their own."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import httpx2
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine.async_engine import AsyncEngine
from proto.baton.v1 import inference_pb2 as pb
from proto.baton.v1 import inference_pb2_grpc as pb_grpc
from services.router.api_keys import AUTH_HELP, ApiKeys
from services.router.http_api import build_http_app
from services.router.openai_protocol import CompletionRequest
from services.router.pipeline import ColocatedPipeline
from services.router.request_plan import plan_completion

from .conftest import MODEL_ID, serve_grpc, serve_http

KEYS = ApiKeys(["sk-tenant-a", "sk-tenant-b"])
# Long enough for several full 16-token blocks; worded for this module alone, so no other
# test has cached it.
PROMPT = (
    "Ledger of the lighthouse keeper on the northern cape, kept in careful longhand: the "
    "lamp was trimmed at dusk, the fog bell rang twice before midnight, and three fishing "
    "boats passed the reef safely under a waning moon."
)


@pytest.mark.parametrize(
    ("host", "keys", "allowed", "refused"),
    [
        ("127.0.0.1", (), False, False),
        ("localhost", (), False, False),
        ("::1", (), False, False),
        ("127.0.0.2", (), False, False),
        ("0.0.0.0", (), False, True),
        ("::", (), False, True),
        ("10.1.2.3", (), False, True),
        ("router.example.com", (), False, True),
        ("0.0.0.0", ("sk-1",), False, False),
        ("0.0.0.0", (), True, False),
    ],
)
def test_a_router_reachable_from_other_hosts_needs_keys_or_an_explicit_opt_out(
    host: str, keys: tuple[str, ...], allowed: bool, refused: bool
) -> None:
    if not refused:
        ApiKeys(keys).check_exposure(host, allow_unauthenticated=allowed)
        return
    with pytest.raises(ValueError) as failure:
        ApiKeys(keys).check_exposure(host, allow_unauthenticated=allowed)
    message = str(failure.value)
    assert message.startswith(f"the router would listen on {host!r}, reachable from other")
    assert "BATON_API_KEYS" in message and "router.allow_unauthenticated: true" in message


def test_keys_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATON_API_KEYS", " sk-1, ,sk-2 ")
    keys = ApiKeys.from_environment()
    assert keys.enabled and keys.tenant("Bearer sk-2") != keys.tenant("Bearer sk-1")
    monkeypatch.setenv("BATON_API_KEYS", "")
    assert not ApiKeys.from_environment().enabled


def test_a_tenant_is_a_digest_of_its_key_never_the_key() -> None:
    tenant = KEYS.tenant("Bearer sk-tenant-a")
    assert len(tenant) == 32 and "sk-tenant-a" not in tenant
    assert KEYS.tenant("bearer  sk-tenant-a ") == tenant  # scheme case and spaces
    assert ApiKeys().tenant(None) == ApiKeys().tenant("Bearer anything") == ""


def test_the_tenant_salts_the_cache_under_the_clients_own_salt(
    pipeline: ColocatedPipeline,
) -> None:
    def salt(tenant: str, cache_salt: str | None) -> bytes:
        request = CompletionRequest(prompt="Hi", cache_salt=cache_salt)
        return plan_completion(request, pipeline, tenant=tenant).cache_salt

    assert salt("", None) == b"" and salt("", "mine") == b"mine"  # no keys: as before
    a = KEYS.tenant("Bearer sk-tenant-a")
    b = KEYS.tenant("Bearer sk-tenant-b")
    assert len({salt(a, None), salt(a, "mine"), salt(b, None), salt(b, "mine")}) == 4
    assert salt(a, "mine").startswith(salt(a, None))
    # a tenant cannot name another's namespace through its own salt
    assert salt(b, salt(a, None).decode()) != salt(a, None)


@pytest.fixture(scope="module")
def keyed_grpc(pipeline: ColocatedPipeline) -> Iterator[grpc.Channel]:
    with (
        serve_grpc(lambda: pipeline, api_keys=KEYS) as address,
        grpc.insecure_channel(address) as channel,
    ):
        yield channel


@pytest.fixture(scope="module")
def keyed_http(pipeline: ColocatedPipeline) -> Iterator[str]:
    with serve_http(build_http_app(lambda: pipeline, api_keys=KEYS)) as url:
        yield url


def grpc_generate(
    channel: grpc.Channel, authorization: str | None, **fields: object
) -> list[pb.GenerateResponse]:
    request = pb.GenerateRequest(**{"max_tokens": 1, "temperature": 0, **fields})
    metadata = None if authorization is None else (("authorization", authorization),)
    return list(pb_grpc.InferenceStub(channel).Generate(request, metadata=metadata, timeout=60))


@pytest.mark.parametrize("authorization", [None, "Bearer sk-wrong", "Basic sk-tenant-a", ""])
def test_grpc_calls_without_a_valid_key_are_unauthenticated(
    keyed_grpc: grpc.Channel, authorization: str | None
) -> None:
    with pytest.raises(grpc.RpcError) as generate:
        grpc_generate(keyed_grpc, authorization, prompt="Hi")
    with pytest.raises(grpc.RpcError) as models:
        metadata = None if authorization is None else (("authorization", authorization),)
        pb_grpc.InferenceStub(keyed_grpc).ListModels(
            pb.ListModelsRequest(), metadata=metadata, timeout=10
        )
    for error in (generate.value, models.value):
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        assert error.details() == AUTH_HELP


def test_grpc_serves_a_valid_key_and_probes_need_none(keyed_grpc: grpc.Channel) -> None:
    (message,) = grpc_generate(keyed_grpc, "Bearer sk-tenant-b", prompt="Hi")
    assert message.finish_reason == "length" and message.usage.completion_tokens == 1
    models = pb_grpc.InferenceStub(keyed_grpc).ListModels(
        pb.ListModelsRequest(), metadata=(("authorization", "Bearer sk-tenant-a"),), timeout=10
    )
    assert [m.id for m in models.models] == [MODEL_ID]
    health = health_pb2_grpc.HealthStub(keyed_grpc)
    check = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert check.status == health_pb2.HealthCheckResponse.SERVING


def test_one_tenant_cannot_see_anothers_cached_prefix(
    keyed_http: str, keyed_grpc: grpc.Channel, engine: AsyncEngine, pipeline: ColocatedPipeline
) -> None:
    """Tenant A's prompt, cached by A over HTTP, is a cache hit for A over gRPC too (one
    key, one tenant, both protocols), and a full prefill for tenant B on either."""
    prompt_tokens = len(pipeline.tokenizer.encode(PROMPT))

    def counters() -> tuple[int, int]:
        return engine.call(lambda e: (e.stats.computed_tokens, e.stats.cached_prompt_tokens))

    def http(key: str) -> tuple[int, int, int]:
        before = counters()
        body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}
        headers = {"authorization": f"Bearer {key}"}
        r = httpx2.post(f"{keyed_http}/v1/completions", json=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
        computed, cached = (now - then for now, then in zip(counters(), before, strict=True))
        return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"], computed, cached

    def over_grpc(key: str) -> tuple[int, int, int]:
        before = counters()
        (message,) = grpc_generate(keyed_grpc, f"Bearer {key}", prompt=PROMPT)
        computed, cached = (now - then for now, then in zip(counters(), before, strict=True))
        return message.usage.cached_tokens, computed, cached

    assert http("sk-tenant-a") == (0, prompt_tokens, 0)
    hit, computed, cached = http("sk-tenant-a")
    assert hit > 0 and (computed, cached) == (prompt_tokens - hit, hit)
    assert over_grpc("sk-tenant-a") == (hit, prompt_tokens - hit, hit)
    # every one of tenant B's prompt tokens is computed, and B is told nothing was cached
    assert http("sk-tenant-b") == (0, prompt_tokens, 0)
    assert over_grpc("sk-tenant-a") == (hit, prompt_tokens - hit, hit)  # A's cache is intact
