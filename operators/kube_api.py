"""KubeApi: the few Kubernetes API calls the actuators make, over kopf's own credentials.

kopf logs in (kubeconfig, service account, or what a test hands it) and gives us the
same `kopf.ConnectionInfo`, so the operator talks to one API server with one identity.
Only what scaling needs: discovery of a kind's plural, GET, and merge-PATCH.
"""

from __future__ import annotations

from typing import Any

import aiohttp
import kopf

TRANSIENT_STATUSES = frozenset({409, 429, 500, 502, 503, 504})


class KubeApiError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status, self.reason, self.message = status, reason, message

    @property
    def transient(self) -> bool:
        """Worth retrying as is: conflicts, throttling, server trouble, no connection."""
        return self.status in TRANSIENT_STATUSES or self.status == 0


class KubeApi:
    def __init__(self) -> None:
        self._info: kopf.ConnectionInfo | None = None
        self._session: aiohttp.ClientSession | None = None
        self._plurals: dict[tuple[str, str], str] = {}

    async def connect(self, info: kopf.ConnectionInfo) -> None:
        """Use `info` from now on (kopf's login handler calls this on every re-login)."""
        if info != self._info:
            await self.close()
            self._info = info

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, path: str) -> dict[str, Any]:
        return await self._request("GET", path)

    async def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request("PATCH", path, body, content_type="application/merge-patch+json")

    async def object_path(self, api_version: str, kind: str, namespace: str, name: str) -> str:
        """`/apis/<group>/<version>/namespaces/<ns>/<plural>/<name>` (or `/api/v1/...`)."""
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        key = (api_version, kind)
        if key not in self._plurals:
            missing = KubeApiError(404, "NotFound", f"the server has no {kind} in {api_version}")
            try:
                listing = await self.get(base)
            except KubeApiError as e:
                raise missing if e.status == 404 else e from e
            for resource in listing.get("resources", []):
                if resource.get("kind") == kind and "/" not in resource["name"]:
                    self._plurals[key] = resource["name"]
                    break
            else:
                raise missing
        return f"{base}/namespaces/{namespace}/{self._plurals[key]}/{name}"

    async def _request(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        session = self._open()
        try:
            async with session.request(
                method, path, json=body, headers={"Content-Type": content_type}
            ) as resp:
                payload = await resp.json(content_type=None)
                if resp.status >= 400:
                    payload = payload if isinstance(payload, dict) else {}
                    raise KubeApiError(
                        resp.status,
                        str(payload.get("reason", resp.reason)),
                        str(payload.get("message", "")),
                    )
                assert isinstance(payload, dict), payload
                return payload
        except (aiohttp.ClientConnectionError, TimeoutError) as e:
            raise KubeApiError(0, "ConnectionError", repr(e)) from e

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            if self._info is None:
                raise KubeApiError(0, "NotLoggedIn", "kopf has not logged in yet")
            info = self._info
            self._session = aiohttp.ClientSession(
                base_url=info.server,
                headers=info.as_http_headers(),
                connector=aiohttp.TCPConnector(
                    ssl=info.as_ssl_context() if info.server.startswith("https") else False
                ),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session
