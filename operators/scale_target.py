"""ScaleTarget: what a CapacityPolicy resizes, read and written through the Kubernetes API.

* `ScaleSubresource`: any object with a `/scale` subresource (Deployment, StatefulSet,
  a CRD that declares one): `spec.replicas` of its Scale, as the HPA does.
* `RayServeDeployment`: one Serve deployment of a KubeRay RayService. Its size lives in
  `spec.serveConfigV2`, a YAML string (`applications[].deployments[]` with `name` and
  `num_replicas`); only that deployment's `num_replicas` changes, written back with the
  resourceVersion that was read, so a concurrent edit makes the write fail, not vanish.
  (The YAML is re-emitted: its comments and key order are not kept.)

Problems a retry will not fix raise `TargetUnavailable` with an HPA-style reason;
transient API errors come through as `KubeApiError` for the caller to retry.
"""

from __future__ import annotations

from typing import Any, Protocol

import yaml

from operators.kube_api import KubeApi, KubeApiError
from operators.policy_spec import ScaleTargetRef


class TargetUnavailable(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message


class ScaleTarget(Protocol):
    async def replicas(self) -> int:
        """The size the target is set to now (what the policy last wrote, or a person)."""
        ...

    async def resize(self, replicas: int) -> None: ...


def _unavailable(e: KubeApiError, what: str, reason: str) -> TargetUnavailable:
    """A lasting API error as the condition it leads to; transient ones go up unchanged."""
    if e.transient:
        raise e
    if e.status == 404:
        return TargetUnavailable("TargetNotFound", f"{what} not found: {e.message}")
    return TargetUnavailable(reason, f"{what}: {e.status} {e.reason}: {e.message}")


async def resolve(api: KubeApi, ref: ScaleTargetRef, namespace: str) -> ScaleTarget:
    """The actuator for `ref`, with its kind's plural looked up on the API server."""
    what = f"{ref.kind} {namespace}/{ref.name}"
    try:
        path = await api.object_path(ref.api_version, ref.kind, namespace, ref.name)
    except KubeApiError as e:
        if e.transient:
            raise
        raise TargetUnavailable("FailedGetScale", f"{what}: {e.message}") from e
    if ref.kind == "RayService":
        assert ref.deployment is not None  # the spec's validator requires it
        return RayServeDeployment(api, path, what, ref.deployment)
    return ScaleSubresource(api, path, what)


class ScaleSubresource:
    def __init__(self, api: KubeApi, path: str, what: str) -> None:
        self._api, self._path, self._what = api, path + "/scale", what

    async def replicas(self) -> int:
        try:
            scale = await self._api.get(self._path)
        except KubeApiError as e:
            raise _unavailable(e, self._what, "FailedGetScale") from e
        return int(scale.get("spec", {}).get("replicas", 0))

    async def resize(self, replicas: int) -> None:
        try:
            await self._api.merge_patch(self._path, {"spec": {"replicas": replicas}})
        except KubeApiError as e:
            raise _unavailable(e, self._what, "FailedUpdateScale") from e


class RayServeDeployment:
    def __init__(self, api: KubeApi, path: str, what: str, deployment: str) -> None:
        self._api, self._path, self._deployment = api, path, deployment
        self._what = f"{what} deployment {deployment}"
        self._read: dict[str, Any] | None = None  # the RayService as last read

    async def replicas(self) -> int:
        try:
            self._read = await self._api.get(self._path)
        except KubeApiError as e:
            raise _unavailable(e, self._what, "FailedGetScale") from e
        _, _, replicas = self._config(self._read)
        return replicas

    async def resize(self, replicas: int) -> None:
        assert self._read is not None, "read replicas() before resize()"
        config, deployment, _ = self._config(self._read)
        deployment["num_replicas"] = replicas
        patch = {
            "metadata": {"resourceVersion": self._read["metadata"].get("resourceVersion")},
            "spec": {"serveConfigV2": yaml.safe_dump(config, sort_keys=False)},
        }
        try:
            self._read = await self._api.merge_patch(self._path, patch)
        except KubeApiError as e:
            raise _unavailable(e, self._what, "FailedUpdateScale") from e

    def _config(self, rayservice: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], int]:
        """The parsed serveConfigV2, our deployment's dict inside it (the same object) and
        its `num_replicas`; a config of the wrong shape is InvalidServeConfig, not a crash."""
        text = rayservice.get("spec", {}).get("serveConfigV2")
        try:
            config = yaml.safe_load(text) if isinstance(text, str) else None
        except yaml.YAMLError as e:
            raise self._invalid(str(e)) from e
        if not isinstance(config, dict):
            raise self._invalid("no serveConfigV2 map")
        found = [
            (f"applications[{i}].deployments[{j}]", d)
            for i, app in enumerate(self._maps(config, "applications", "applications"))
            for j, d in enumerate(self._maps(app, "deployments", f"applications[{i}].deployments"))
            if d.get("name") == self._deployment
        ]
        if len(found) != 1:
            raise TargetUnavailable(
                "DeploymentNotFound",
                f"{self._what}: {len(found)} Serve deployments of that name in serveConfigV2",
            )
        where, deployment = found[0]
        replicas = deployment.get("num_replicas", 1)
        if "autoscaling_config" in deployment or replicas == "auto":
            raise TargetUnavailable(
                "ServeAutoscalingEnabled",
                f"{self._what}: Ray Serve autoscales it already; "
                "remove its autoscaling_config or this policy",
            )
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 0:
            raise self._invalid(
                f"{where}.num_replicas is {replicas!r}, "
                "not a replica count (an integer of at least 0)"
            )
        return config, deployment, replicas

    def _maps(self, parent: dict[str, Any], key: str, where: str) -> list[dict[str, Any]]:
        """`parent[key]`, a list of maps (absent: none); `where` names it in the message."""
        items = parent.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise self._invalid(f"{where} must be a list of maps")
        return items

    def _invalid(self, problem: str) -> TargetUnavailable:
        return TargetUnavailable("InvalidServeConfig", f"{self._what}: {problem}")
