"""API keys: who may call the router, and which tenant each request belongs to.

One policy for both front ends: HTTP sends `Authorization: Bearer <key>`, gRPC the
metadata `authorization: Bearer <key>`; a missing or unknown key is 401 / UNAUTHENTICATED.

Keys are required wherever the router is reachable from other hosts: `check_exposure`
refuses a non-loopback listen address without keys unless the operator opts out
(`router.allow_unauthenticated`). On loopback they are optional, and without keys every
request is anonymous.

A request's tenant is a digest of the key it used, never the key itself. It namespaces
the prefix cache (request_plan mixes it into the cache salt), so one tenant can never
find another's prompts through `cached_tokens` or time to first token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Collection

from services.router.errors import AuthenticationError

KEYS_ENV = "BATON_API_KEYS"
AUTH_HELP = "a valid API key is required: Authorization: Bearer <key>"
_TENANT_DOMAIN = b"baton.tenant.v1\0"


class ApiKeys:
    """The keys the router accepts; none means authentication is off."""

    def __init__(self, keys: Collection[str] = ()) -> None:
        self._keys = [key.encode() for key in keys if key]

    @classmethod
    def from_environment(cls) -> ApiKeys:
        """BATON_API_KEYS, comma-separated (the Helm chart mounts it from a Secret)."""
        return cls([k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()])

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def tenant(self, authorization: str | None) -> str:
        """The tenant of a request carrying this Authorization value: "" (anonymous) when
        no keys are configured, else the hex digest of its key. Raises AuthenticationError
        (401, UNAUTHENTICATED) for a missing, malformed or unknown key."""
        if not self._keys:
            return ""
        scheme, _, key = (authorization or "").partition(" ")
        presented = key.strip().encode()
        # compare_digest against every key: the time taken does not tell which one is close
        matches = [hmac.compare_digest(presented, k) for k in self._keys]
        if scheme.lower() != "bearer" or not any(matches):
            raise AuthenticationError(AUTH_HELP)
        return hashlib.sha256(_TENANT_DOMAIN + presented).hexdigest()[:32]

    def check_exposure(self, host: str, allow_unauthenticated: bool) -> None:
        """Refuses (ValueError) to serve `host` without keys unless it is a loopback
        address or `allow_unauthenticated` is set."""
        if self._keys or allow_unauthenticated or is_loopback(host):
            return
        raise ValueError(
            f"the router would listen on {host!r}, reachable from other hosts, with no API "
            f"keys: set {KEYS_ENV} (comma-separated keys), listen on 127.0.0.1, or set "
            "router.allow_unauthenticated: true to serve without keys on purpose"
        )


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False
