"""Renders charts/baton with the real Helm engine (helm-python-sdk: Helm's Go SDK through
its C ABI), offline, and reads the result back as Kubernetes objects.

`VALUE_SETS` are the installs the tests cover; `render(name)` is cached per value set.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml
from helm_python import _native

ROOT = Path(__file__).parents[2]
CHART_DIR = ROOT / "charts" / "baton"
RELEASE = "llm"
NAMESPACE = "serving"
FULLNAME = "llm-baton"
SCRAPE_CONFIG_API = "monitoring.coreos.com/v1alpha1/ScrapeConfig"

Manifest = dict[str, Any]


@dataclass(frozen=True)
class ValueSet:
    values: dict[str, Any]
    # API versions the simulated cluster serves beyond the built-in ones (`--api-versions`).
    api_versions: tuple[str, ...] = ()


_GPU_POOL = {
    "cpus": 8,
    "gpus": 1,
    "resources": {"requests": {"cpu": "8", "memory": "64Gi"}, "limits": {"memory": "64Gi"}},
    "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": RELEASE}},
                    },
                }
            ]
        }
    },
}

VALUE_SETS: dict[str, ValueSet] = {
    "default": ValueSet({}),
    "gpu-pools": ValueSet(
        {
            "image": {"flavor": "cuda"},
            "model": {
                "path": "/models/Llama-3.1-8B-Instruct",
                "servedName": "meta-llama/Llama-3.1-8B-Instruct",
                "maxModelLen": 8192,
                "kernelBackend": "triton",
                "device": "cuda",
                "volume": {"persistentVolumeClaim": {"claimName": "llama-weights"}},
            },
            "pools": {
                "prefill": {**_GPU_POOL, "replicas": 2, "minReplicas": 2, "maxReplicas": 8},
                "decode": {**_GPU_POOL, "replicas": 4, "minReplicas": 2, "maxReplicas": 16},
            },
        }
    ),
    "external-redis": ValueSet(
        {"redis": {"enabled": False, "external": {"url": "rediss://cache.infra:6380/2"}}}
    ),
    "external-redis-secret": ValueSet(
        {
            "kvstore": {"shards": 2},
            "redis": {"enabled": False, "external": {"existingSecret": "baton-redis"}},
        }
    ),
    "scrape-config": ValueSet(
        {
            "metrics": {"scrapeConfig": {"enabled": True, "labels": {"release": "prom"}}},
            "router": {"replicas": 2},
        },
        api_versions=(SCRAPE_CONFIG_API,),
    ),
    "operator-off": ValueSet({"operator": {"enabled": False}}),
    "kvstore-3-shards": ValueSet(
        {
            "kvstore": {
                "shards": 3,
                "resources": {"requests": {"memory": "16Gi"}, "limits": {"memory": "16Gi"}},
            }
        }
    ),
    "colocated": ValueSet({"mode": "colocated", "pools": {"prefill": {"replicas": 0}}}),
    "cluster-wide": ValueSet(
        {
            "operator": {
                "clusterWide": True,
                "metricsSource": "http://prometheus-operated.monitoring:9090",
            },
            "router": {"replicas": 3, "service": {"type": "LoadBalancer"}},
            "apiKeys": {"keys": ["sk-team-a-0123456789abcdef", "sk-team-b-0123456789abcdef"]},
            "inferencePool": {"enabled": True, "endpointPicker": {"name": "baton-epp"}},
            "networkPolicy": {"enabled": False},
        }
    ),
}


@dataclass(frozen=True)
class Release:
    """What `helm install` would create: every object (test hooks included) and NOTES.txt."""

    objects: list[Manifest]
    notes: str
    templates: dict[str, list[Manifest]] = field(repr=False)

    def of_kind(self, kind: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Manifest:
        (found,) = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        return found

    def names(self, kind: str) -> set[str]:
        return {o["metadata"]["name"] for o in self.of_kind(kind)}

    @property
    def rayservice(self) -> Manifest:
        return self.get("RayService", FULLNAME)

    @property
    def serve_config(self) -> dict[str, Any]:
        config: dict[str, Any] = yaml.safe_load(self.rayservice["spec"]["serveConfigV2"])
        return config

    @property
    def serving_config(self) -> dict[str, Any]:
        (app,) = self.serve_config["applications"]
        args: dict[str, Any] = app["args"]
        return args

    def worker_group(self, name: str) -> dict[str, Any]:
        groups = self.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        (group,) = [g for g in groups if g["groupName"] == name]
        return group


@cache
def _chart() -> helm.Chart:
    return helm.Chart.load(CHART_DIR)


def render_values(values: dict[str, Any], api_versions: tuple[str, ...] = ()) -> Release:
    """Renders an install of `values`; raises helm's HelmValuesError / HelmRenderError."""
    options: dict[str, Any] = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True}
    if api_versions:
        options["api_versions"] = list(api_versions)
    # Chart.render has no api_versions keyword; the engine's render options (the JSON the
    # C ABI takes) do, as `helm template --api-versions` does.
    rendered: dict[str, str] = json.loads(
        _native.call_string("helm_render", _chart()._raw(), json.dumps(values), json.dumps(options))
    )
    templates = {
        path.removeprefix("baton/"): [doc for doc in yaml.safe_load_all(text) if doc]
        for path, text in rendered.items()
        if not path.endswith("NOTES.txt")
    }
    objects = [doc for docs in templates.values() for doc in docs]
    return Release(objects, rendered["baton/templates/NOTES.txt"], templates)


@cache
def render(value_set: str) -> Release:
    spec = VALUE_SETS[value_set]
    return render_values(spec.values, spec.api_versions)


def pod_specs(release: Release) -> Iterator[tuple[str, dict[str, Any]]]:
    """("<kind>/<name>[/<group>]", pod spec) of every pod the release makes, Ray's included."""
    for obj in release.objects:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Pod":
            yield where, obj["spec"]
        elif obj["kind"] in ("Deployment", "StatefulSet"):
            yield where, obj["spec"]["template"]["spec"]
        elif obj["kind"] == "RayService":
            for group, template in ray_templates(obj):
                yield f"{where}/{group}", template["spec"]


def ray_templates(rayservice: Manifest) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, pod template) of the head ("head") and every worker group."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]
