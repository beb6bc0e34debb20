"""The KV store token: one Secret, mounted as a file into the shards and into the Ray pods
whose Baton code calls the shards (router, prefill, decode), and named in the
ServingConfig by path only, so the token never appears in the RayService."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest

from services.serving_config import ServingConfig
from tests.chart.chart import FULLNAME, Manifest, Release, ray_templates, render, render_values

SECRET = f"{FULLNAME}-kvstore-token"
TOKEN_FILE = "/etc/baton/kvstore-token/token"
MOUNT = {"name": "kvstore-token", "mountPath": "/etc/baton/kvstore-token", "readOnly": True}


def secret_volume(name: str) -> dict[str, Any]:
    return {"name": "kvstore-token", "secret": {"secretName": name, "defaultMode": 0o440}}


def kvstore_pod(release: Release) -> dict[str, Any]:
    spec: dict[str, Any] = release.get("StatefulSet", f"{FULLNAME}-kvstore")["spec"]
    return spec["template"]["spec"]


def token_of(secret: Manifest) -> str:
    return base64.b64decode(secret["data"]["token"]).decode()


def assert_mounted(release: Release, secret_name: str) -> None:
    pod = kvstore_pod(release)
    (shard,) = pod["containers"]
    assert f"--token-file={TOKEN_FILE}" in shard["args"]
    assert MOUNT in shard["volumeMounts"]
    assert secret_volume(secret_name) in pod["volumes"]
    mounted = set()
    for group, template in ray_templates(release.rayservice):
        (container,) = template["spec"]["containers"]
        if MOUNT in container["volumeMounts"]:
            assert secret_volume(secret_name) in template["spec"]["volumes"]
            mounted.add(group)
    assert mounted == {"router", "prefill", "decode"}  # not the head: it runs no Baton code
    kv = ServingConfig.model_validate(release.serving_config).kvstore
    assert (kv.token, kv.token_file, kv.tls) == (None, TOKEN_FILE, False)


def test_default_install_generates_a_token_and_mounts_it_everywhere_it_is_used() -> None:
    release = render("default")
    secret = release.get("Secret", SECRET)
    token = token_of(secret)
    assert len(token) == 48 and token.isalnum()
    assert secret["metadata"]["labels"]["app.kubernetes.io/component"] == "kvstore"
    assert_mounted(release, SECRET)
    assert token not in json.dumps(release.rayservice)
    assert token not in json.dumps(release.get("StatefulSet", f"{FULLNAME}-kvstore"))


def test_a_given_token_is_stored_and_an_existing_secret_is_used_as_is() -> None:
    given = render_values({"kvstore": {"auth": {"token": "kv-team-token-0123456789"}}})
    assert token_of(given.get("Secret", SECRET)) == "kv-team-token-0123456789"
    existing = render_values({"kvstore": {"auth": {"existingSecret": "baton-kv-token"}}})
    assert SECRET not in existing.names("Secret")
    assert_mounted(existing, "baton-kv-token")


@pytest.mark.parametrize(
    "values",
    [{"kvstore": {"auth": {"enabled": False}}}, {"mode": "colocated"}],
    ids=["auth-off", "colocated"],
)
def test_no_token_where_the_kv_store_takes_none(values: dict[str, Any]) -> None:
    if values.get("mode") == "colocated":
        values = {**values, "pools": {"prefill": {"replicas": 0}}}
    release = render_values(values)
    assert SECRET not in release.names("Secret")
    text = json.dumps(release.objects)
    assert "kvstore-token" not in text and "--token-file" not in text
    assert release.serving_config["kvstore"]["token_file"] is None


def test_a_token_too_short_to_guess_is_refused() -> None:
    with pytest.raises(helm.HelmValuesError) as raised:
        render_values({"kvstore": {"auth": {"token": "short"}}})
    assert "at '/kvstore/auth/token': 'short' does not match pattern" in str(raised.value)


def test_the_mounted_file_is_what_the_pools_read(tmp_path: Path) -> None:
    """The ServingConfig the chart writes resolves its token from the mounted file."""
    release = render_values({"kvstore": {"auth": {"token": "kv-team-token-0123456789"}}})
    mounted = tmp_path / "token"
    mounted.write_bytes(base64.b64decode(release.get("Secret", SECRET)["data"]["token"]))
    args = release.serving_config
    args["kvstore"]["token_file"] = str(mounted)  # where this test "mounts" it
    security = ServingConfig.model_validate(args).kvstore.client_security()
    assert security.metadata == (("authorization", "Bearer kv-team-token-0123456789"),)
