"""Cluster: kmock's Kubernetes emulator, with the few API server duties the operator relies on.

kmock stores and streams objects over real HTTP (lists, watches, merge and JSON
patches, finalizers); this subclass adds what a real API server does on top:
names from `generateName` (kopf posts Events that way), `uid`/`resourceVersion`/
`generation` on create, `generation` bumped by spec changes, and the `/scale`
subresource answering with an `autoscaling/v1` Scale built from `spec.replicas`.
"""

from __future__ import annotations

import itertools
from typing import Any

import aiohttp.web
import kmock

CAPACITY_POLICIES = "baton.dev/v1alpha1/capacitypolicies"
RAYSERVICES = "ray.io/v1/rayservices"
DEPLOYMENTS = "apps/v1/deployments"
EVENTS = "v1/events"

_ids = itertools.count(1)


class Cluster(kmock.KubernetesEmulator):
    def declare_baton_resources(self) -> None:
        """Built-in kinds (deployments with /scale, events, CRDs), plus ours and KubeRay's."""
        self.resources.load_bundled()
        self.resources[CAPACITY_POLICIES] = kmock.ResourceInfo(
            kind="CapacityPolicy",
            namespaced=True,
            subresources={"status"},
            verbs={"get", "list", "watch", "create", "patch", "delete"},
        )
        self.resources[RAYSERVICES] = kmock.ResourceInfo(
            kind="RayService",
            namespaced=True,
            subresources={"status"},
            verbs={"get", "list", "watch", "create", "patch", "delete"},
        )

    def stored(self, resource: str, namespace: str, name: str) -> dict[str, Any]:
        """The stored object, as plain data."""
        return self.objects[resource, namespace, name].raw

    def all_of(self, resource: str) -> list[dict[str, Any]]:
        wanted = kmock.resource(resource)
        return [o.raw for (r, _, _), o in self.objects.items() if r == wanted and not o.deleted]

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        key = self._key(request)
        if request.action == kmock.action.CREATE and isinstance(request.data, dict):
            meta = request.data.setdefault("metadata", {})
            n = next(_ids)
            meta.setdefault("name", f"{meta.get('generateName', 'obj-')}{n:05d}")
            meta.update(uid=f"uid-{n}", resourceVersion="1", generation=1)
            meta.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        elif (
            request.action == kmock.action.UPDATE
            and request.subresource is None
            and isinstance(request.data, dict)
            and "spec" in request.data
            and key is not None
            and key in self.objects
        ):
            generation = self.objects[key].get("metadata", {}).get("generation", 1) + 1
            request.data.setdefault("metadata", {})["generation"] = generation
        if request.subresource == "scale" and request.action in (
            kmock.action.FETCH,
            kmock.action.UPDATE,
        ):
            if key is None or key not in self.objects or self.objects[key].deleted:
                raise kmock.KubernetesObjectNotFoundError()
            if request.action == kmock.action.UPDATE:
                response = await super()._handle(request)  # stores it, or a test's reaction
                if response.status >= 400:
                    return response
            return aiohttp.web.json_response(_scale(self.objects[key].raw))
        return await super()._handle(request)

    @staticmethod
    def _key(request: kmock.Request) -> tuple[kmock.resource, str | None, str] | None:
        if request.resource is None or request.name is None:
            return None
        return request.resource, request.namespace, request.name


def _scale(obj: dict[str, Any]) -> dict[str, Any]:
    replicas = obj.get("spec", {}).get("replicas", 1)
    return {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {k: obj["metadata"][k] for k in ("name", "namespace") if k in obj["metadata"]},
        "spec": {"replicas": replicas},
        "status": {"replicas": obj.get("status", {}).get("replicas", replicas)},
    }
