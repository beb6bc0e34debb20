"""The bundled Redis requires a password, kept in a Secret the chart generates; the KV
store shards, its only clients, get it from there (never in a manifest's plain text)."""

from __future__ import annotations

import base64
from typing import Any

from tests.chart.chart import FULLNAME, render_values

SECRET = f"{FULLNAME}-redis-password"
FROM_SECRET = {"secretKeyRef": {"name": SECRET, "key": "password"}}


def container(release: Any, name: str) -> dict[str, Any]:
    (c,) = release.get("StatefulSet", f"{FULLNAME}-{name}")["spec"]["template"]["spec"][
        "containers"
    ]
    return c


def test_the_bundled_redis_admits_only_the_shards() -> None:
    release = render_values({})
    password = base64.b64decode(release.get("Secret", SECRET)["data"]["password"]).decode()
    assert len(password) >= 32
    redis = container(release, "redis")
    args = redis["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert {"name": "REDIS_PASSWORD", "valueFrom": FROM_SECRET} in redis["env"]
    shard = container(release, "kvstore")
    assert {"name": "BATON_REDIS_PASSWORD", "valueFrom": FROM_SECRET} in shard["env"]
    assert password not in str([o for o in release.objects if o["kind"] != "Secret"])


def test_an_external_redis_brings_its_own_credentials() -> None:
    release = render_values({"redis": {"enabled": False, "external": {"url": "redis://r:6379"}}})
    assert SECRET not in release.names("Secret")
    env = container(release, "kvstore")["env"]
    assert not [e for e in env if e["name"] == "BATON_REDIS_PASSWORD"]
