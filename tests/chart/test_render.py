"""The chart renders for every value set, lints clean, and every object it makes is one the
API server would admit: built-in kinds against the Kubernetes schemas of a recent release
(kubernetes-validate, strict: unknown fields are errors), custom resources against their
CRDs (CapacityPolicy: the chart's own; RayService, ScrapeConfig, InferencePool: trimmed
copies under tests/chart/crds/), and the pod templates inside the RayService against the
core PodTemplateSpec."""

from __future__ import annotations

import base64
import copy
import textwrap
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.chart.chart import (
    CHART_DIR,
    FULLNAME,
    NAMESPACE,
    RELEASE,
    VALUE_SETS,
    Manifest,
    pod_specs,
    ray_templates,
    render,
    render_values,
)
from tests.operator.crd_schema import CRD_PATH, CrdSchema

KUBERNETES = kubernetes_validate.utils.latest_version()
CRDS = Path(__file__).parent / "crds"
CUSTOM_KINDS = {
    ("baton.dev/v1alpha1", "CapacityPolicy"): (CRD_PATH, "v1alpha1"),
    ("ray.io/v1", "RayService"): (CRDS / "rayservice.yaml", "v1"),
    ("monitoring.coreos.com/v1alpha1", "ScrapeConfig"): (CRDS / "scrapeconfig.yaml", "v1alpha1"),
    ("inference.networking.k8s.io/v1", "InferencePool"): (CRDS / "inferencepool.yaml", "v1"),
}
SELECTOR = {"app.kubernetes.io/name": "baton", "app.kubernetes.io/instance": RELEASE}
STANDARD_LABELS = {
    **SELECTOR,
    "app.kubernetes.io/managed-by": "Helm",
    "app.kubernetes.io/part-of": "baton",
    "app.kubernetes.io/version": "0.1.0",
    "helm.sh/chart": "baton-0.1.0",
}

value_sets = pytest.mark.parametrize("value_set", list(VALUE_SETS))


@cache
def _crd(api_version: str, kind: str) -> CrdSchema:
    path, version = CUSTOM_KINDS[api_version, kind]
    return CrdSchema(yaml.safe_load(path.read_text()), version)


def kubernetes_errors(obj: Manifest) -> list[str]:
    try:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '<root>'}: {e.message}"]
    return []


def admission_errors(obj: Manifest) -> list[str]:
    key = (obj["apiVersion"], obj["kind"])
    if key in CUSTOM_KINDS:
        errors = _crd(*key).errors(obj)
        if obj["kind"] == "RayService":
            errors += _ray_start_params_errors(obj)
            for group, template in ray_templates(obj):
                pod_template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": group},
                    "template": template,
                }
                errors += [f"{group}: {e}" for e in kubernetes_errors(pod_template)]
        return errors
    return kubernetes_errors(obj)


def _ray_start_params_errors(rayservice: Manifest) -> list[str]:
    """rayStartParams are map[string]string, which tests.operator.crd_schema's conversion
    leaves untyped (it drops additionalProperties): check the values here."""
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g.get("groupName", "?"), g) for g in cluster["workerGroupSpecs"]]
    return [
        f"{name}: rayStartParams.{key}: {value!r} is not a string"
        for name, group in groups
        for key, value in group.get("rayStartParams", {}).items()
        if not isinstance(value, str)
    ]


@value_sets
def test_every_object_is_admitted(value_set: str) -> None:
    release = render(value_set)
    found = {f"{o['kind']}/{o['metadata']['name']}": admission_errors(o) for o in release.objects}
    assert {where: errors for where, errors in found.items() if errors} == {}


def test_admission_checks_can_fail() -> None:
    """The validators above reject what the API server would: a sanity check on them."""
    release = render("default")
    rayservice = copy.deepcopy(release.rayservice)
    decode = rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"][2]
    decode["rayStartParams"]["num-gpus"] = 1
    decode["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = [4]
    rayservice["spec"]["rayClusterConfig"]["autoscalerOptions"]["upscalingMode"] = "Fast"
    assert admission_errors(rayservice) == [
        "spec.rayClusterConfig.autoscalerOptions.upscalingMode: 'Fast' is not one of "
        "['Default', 'Aggressive', 'Conservative']",
        "decode: rayStartParams.num-gpus: 1 is not a string",
        "decode: template.spec.containers.0.resources.limits.memory: [4] is not valid under "
        "any of the given schemas",
    ]
    policy = copy.deepcopy(release.get("CapacityPolicy", f"{FULLNAME}-decode"))
    policy["spec"]["minReplicas"] = 9
    assert admission_errors(policy) == [
        "spec: minReplicas must be less than or equal to maxReplicas"
    ]
    service = copy.deepcopy(release.get("Service", f"{FULLNAME}-router"))
    service["spec"]["ports"][0]["port"] = "http"
    assert admission_errors(service) == ["spec.ports.0.port: 'http' is not of type 'integer'"]


@value_sets
def test_lints_clean(value_set: str) -> None:
    report = helm.lint(CHART_DIR, VALUE_SETS[value_set].values, strict=True, namespace=NAMESPACE)
    # Severity 1 is informational (Helm recommends an icon); 2 and up are warnings, errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    assert report["errors"] == []


def test_the_crds_come_only_from_crds_directory() -> None:
    with helm.Chart.load(CHART_DIR) as chart:
        assert [c["filename"] for c in chart.crds] == ["baton/crds/capacitypolicy.yaml"]
    for value_set in VALUE_SETS:
        assert render(value_set).of_kind("CustomResourceDefinition") == []


@value_sets
def test_every_object_carries_the_standard_labels(value_set: str) -> None:
    for obj in render(value_set).objects:
        labels = obj["metadata"]["labels"]
        assert labels.items() >= STANDARD_LABELS.items(), obj["metadata"]["name"]
        assert labels["app.kubernetes.io/component"]


@value_sets
def test_objects_take_the_release_namespace(value_set: str) -> None:
    """No namespace is written into an object but the operator's Roles, one per namespace
    it watches, which must name it."""
    placed = {
        (o["kind"], o["metadata"]["namespace"])
        for o in render(value_set).objects
        if "namespace" in o["metadata"]
    }
    assert {kind for kind, _ in placed} <= {"Role", "RoleBinding"}


@value_sets
def test_every_container_runs_unprivileged_with_resources(value_set: str) -> None:
    for where, spec in pod_specs(render(value_set)):
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert context["readOnlyRootFilesystem"] is True, where
            assert container["resources"]["requests"], where
            assert container["resources"]["limits"]["memory"], where


@value_sets
def test_long_running_containers_have_probes(value_set: str) -> None:
    """The kvstore, Redis and the operator define their own; Ray pods get KubeRay's, but the
    router's (test_probes.py)."""
    release = render(value_set)
    for obj in release.of_kind("StatefulSet") + release.of_kind("Deployment"):
        container = _container(obj)
        assert "livenessProbe" in container, obj["metadata"]["name"]
        if obj["kind"] == "StatefulSet":
            assert "readinessProbe" in container, obj["metadata"]["name"]
    (router,) = release.worker_group("router")["template"]["spec"]["containers"]
    assert {"readinessProbe", "livenessProbe"} <= router.keys()


def test_default_install() -> None:
    release = render("default")
    assert {(o["kind"], o["metadata"]["name"]) for o in release.objects} == {
        ("RayService", FULLNAME),
        ("Service", f"{FULLNAME}-router"),
        ("Secret", f"{FULLNAME}-api-keys"),
        ("Secret", f"{FULLNAME}-kvstore-token"),
        ("Secret", f"{FULLNAME}-redis-password"),
        ("Service", f"{FULLNAME}-kvstore"),
        ("StatefulSet", f"{FULLNAME}-kvstore"),
        ("Service", f"{FULLNAME}-redis"),
        ("StatefulSet", f"{FULLNAME}-redis"),
        ("ServiceAccount", f"{FULLNAME}-operator"),
        ("Deployment", f"{FULLNAME}-operator"),
        ("Role", f"{FULLNAME}-operator"),
        ("RoleBinding", f"{FULLNAME}-operator"),
        ("CapacityPolicy", f"{FULLNAME}-prefill"),
        ("CapacityPolicy", f"{FULLNAME}-decode"),
        ("PodDisruptionBudget", f"{FULLNAME}-kvstore"),
        ("NetworkPolicy", f"{FULLNAME}-kvstore"),
        ("NetworkPolicy", f"{FULLNAME}-redis"),
        ("Pod", f"{FULLNAME}-test-kuberay"),
        ("Pod", f"{FULLNAME}-test-router"),
    }
    groups = release.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [
        (g["groupName"], g["replicas"], g["minReplicas"], g["maxReplicas"]) for g in groups
    ] == [
        ("router", 1, 1, 1),
        ("prefill", 1, 1, 4),
        ("decode", 1, 1, 8),
    ]


def test_helm_test_hooks() -> None:
    release = render("default")
    tests = [o for o in release.of_kind("Pod")]
    assert {p["metadata"]["annotations"]["helm.sh/hook"] for p in tests} == {"test"}
    (kuberay,) = [p for p in tests if p["metadata"]["name"].endswith("test-kuberay")]
    script = kuberay["spec"]["containers"][0]["args"][0]
    assert "/apis/ray.io/v1" in script and '"name":"rayservices"' in script
    (router,) = [p for p in tests if p["metadata"]["name"].endswith("test-router")]
    script = router["spec"]["containers"][0]["args"][0]
    assert f"http://{FULLNAME}-router:8000/health" in script
    assert f"http://{FULLNAME}-router:8000/v1/models" in script


def _container(obj: Manifest) -> dict[str, Any]:
    (container,) = obj["spec"]["template"]["spec"]["containers"]
    return container


def test_gpu_pools() -> None:
    release = render("gpu-pools")
    for pool in ("prefill", "decode"):
        group = release.worker_group(pool)
        spec = group["template"]["spec"]
        (container,) = spec["containers"]
        assert container["image"] == "baton:0.1.0-cuda"
        assert container["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": 1}
        assert group["rayStartParams"]["num-gpus"] == "1"
        assert group["rayStartParams"]["num-cpus"] == "8"
        assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
        assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert "podAntiAffinity" in spec["affinity"]
        assert {"name": "model", "mountPath": "/models", "readOnly": True} in container[
            "volumeMounts"
        ]
        assert {"name": "model", "persistentVolumeClaim": {"claimName": "llama-weights"}} in spec[
            "volumes"
        ]
        assert release.serving_config[pool]["num_gpus"] == 1
    (router,) = release.worker_group("router")["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in router["resources"]["limits"]
    assert release.serving_config["model"]["device"] == "cuda"
    prefill_pdb = release.get("PodDisruptionBudget", f"{FULLNAME}-prefill")
    assert prefill_pdb["spec"]["minAvailable"] == 1  # minReplicas 2 - 1


def test_external_redis_url() -> None:
    release = render("external-redis")
    assert "redis" not in {
        o["metadata"]["labels"]["app.kubernetes.io/component"] for o in release.objects
    }
    env = _container(release.get("StatefulSet", f"{FULLNAME}-kvstore"))["env"]
    assert {"name": "REDIS_URL", "value": "rediss://cache.infra:6380/2"} in env
    assert release.serving_config["kvstore"]["redis_url"] == "rediss://cache.infra:6380/2"
    assert release.names("NetworkPolicy") == {f"{FULLNAME}-kvstore"}


def test_external_redis_from_a_secret() -> None:
    release = render("external-redis-secret")
    env = _container(release.get("StatefulSet", f"{FULLNAME}-kvstore"))["env"]
    assert {
        "name": "REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": "baton-redis", "key": "redis-url"}},
    } in env
    # The password stays out of the RayService.
    assert release.serving_config["kvstore"]["redis_url"] is None


def test_bundled_redis_is_a_lru_cache() -> None:
    redis = render("default").get("StatefulSet", f"{FULLNAME}-redis")
    args = _container(redis)["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert args[args.index("--maxmemory") + 1] == str(512 * 2**20 * 80 // 100)


def test_one_scrape_of_the_router_service_per_interval_where_the_api_exists() -> None:
    """Every router replica serves the whole platform's totals: Prometheus reads them once
    through the router Service, never once per router pod (no ServiceMonitor)."""
    release = render("scrape-config")
    (scrape,) = release.of_kind("ScrapeConfig")
    assert scrape["metadata"]["name"] == f"{FULLNAME}-router"
    assert scrape["metadata"]["labels"]["release"] == "prom"
    router = release.get("Service", f"{FULLNAME}-router")
    (http,) = [p for p in router["spec"]["ports"] if p["name"] == "http"]
    assert scrape["spec"] == {
        "scrapeInterval": "15s",
        "metricsPath": "/metrics",
        "staticConfigs": [
            {"targets": [f"{FULLNAME}-router.{NAMESPACE}.svc.cluster.local:{http['port']}"]}
        ],
    }
    assert release.worker_group("router")["replicas"] == 2
    assert {"ServiceMonitor", "PodMonitor"}.isdisjoint(o["kind"] for o in release.objects)
    without_api = render_values(VALUE_SETS["scrape-config"].values)
    assert without_api.of_kind("ScrapeConfig") == []
    assert "does not serve\nmonitoring.coreos.com/v1alpha1 ScrapeConfig" in without_api.notes
    assert render("default").of_kind("ScrapeConfig") == []


def test_operator_off() -> None:
    release = render("operator-off")
    components = {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in release.objects}
    assert "operator" not in components
    assert release.of_kind("CapacityPolicy") == []
    assert {"ServiceAccount", "Role", "RoleBinding", "Deployment"}.isdisjoint(
        o["kind"] for o in release.objects
    )
    assert (
        "WARNING: operator.enabled is false, so no CapacityPolicy sizes the prefill and decode\n"
        "pools, which stay at pools.*.replicas."
    ) in release.notes
    assert "WARNING: operator.enabled" not in render("default").notes
    fixed = {"enabled": False}
    acknowledged = render_values(
        {
            "operator": {"enabled": False},
            "pools": {"prefill": {"capacityPolicy": fixed}, "decode": {"capacityPolicy": fixed}},
        }
    )
    assert "WARNING: operator.enabled" not in acknowledged.notes


def test_three_kvstore_shards() -> None:
    release = render("kvstore-3-shards")
    kvstore = release.get("StatefulSet", f"{FULLNAME}-kvstore")
    assert kvstore["spec"]["replicas"] == 3
    assert kvstore["spec"]["serviceName"] == f"{FULLNAME}-kvstore"
    args = _container(kvstore)["args"]
    assert f"--capacity={16 * 2**30 * 80 // 100}" in args
    assert "--shard-id=$(POD_NAME)" in args
    domain = f"{FULLNAME}-kvstore.{NAMESPACE}.svc.cluster.local"
    assert f"--advertise-address=$(POD_NAME).{domain}:50052" in args
    assert "--metrics-port=9090" in args
    ports = {p["name"]: p["containerPort"] for p in _container(kvstore)["ports"]}
    assert ports == {"grpc": 50052, "metrics": 9090}
    # What each shard advertises is exactly what the ServingConfig's clients dial.
    assert release.serving_config["kvstore"]["targets"] == [
        f"{FULLNAME}-kvstore-{ordinal}.{domain}:50052" for ordinal in range(3)
    ]
    headless = release.get("Service", f"{FULLNAME}-kvstore")
    assert headless["spec"]["clusterIP"] == "None"
    assert [(p["name"], p["port"]) for p in headless["spec"]["ports"]] == [
        ("grpc", 50052),
        ("metrics", 9090),
    ]


def test_colocated_mode_has_no_prefill_pool_and_no_kv_store() -> None:
    release = render("colocated")
    groups = release.rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["router", "decode"]
    assert release.names("CapacityPolicy") == {f"{FULLNAME}-decode"}
    assert release.of_kind("StatefulSet") == []
    assert release.serving_config["kvstore"]["targets"] == []


def test_cluster_wide_operator() -> None:
    release = render("cluster-wide")
    args = _container(release.get("Deployment", f"{FULLNAME}-operator"))["args"]
    assert "--all-namespaces" in args
    assert "--metrics-source=http://prometheus-operated.monitoring:9090" in args
    role = release.get("ClusterRole", f"{FULLNAME}-operator")
    assert role["rules"][-1] == {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["list", "watch"],
    }
    binding = release.get("ClusterRoleBinding", f"{FULLNAME}-operator")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": f"{FULLNAME}-operator", "namespace": NAMESPACE}
    ]
    # Policies read the operator's Prometheus rather than the router's page.
    assert all("metrics" not in p["spec"] for p in release.of_kind("CapacityPolicy"))
    assert release.get("PodDisruptionBudget", f"{FULLNAME}-router")["spec"]["minAvailable"] == 2


def test_operator_rbac_is_the_documented_least_privilege() -> None:
    """docs/capacitypolicy.md, "RBAC the operator needs", for one watched namespace."""
    release = render("default")
    role = release.get("Role", f"{FULLNAME}-operator")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [
        {
            "apiGroups": ["baton.dev"],
            "resources": ["capacitypolicies"],
            "verbs": ["get", "list", "watch", "patch"],
        },
        {
            "apiGroups": ["baton.dev"],
            "resources": ["capacitypolicies/status"],
            "verbs": ["get", "patch"],
        },
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        {"apiGroups": ["ray.io"], "resources": ["rayservices"], "verbs": ["get", "patch"]},
        {
            "apiGroups": ["apps"],
            "resources": ["deployments/scale", "statefulsets/scale"],
            "verbs": ["get", "patch"],
        },
    ]
    args = _container(release.get("Deployment", f"{FULLNAME}-operator"))["args"]
    assert f"--namespace={NAMESPACE}" in args
    operator_pod = release.get("Deployment", f"{FULLNAME}-operator")["spec"]["template"]["spec"]
    assert operator_pod["serviceAccountName"] == f"{FULLNAME}-operator"


def test_capacity_policies_target_the_rayservice_deployments() -> None:
    release = render("default")
    deployments = {d["name"] for d in release.serve_config["applications"][0]["deployments"]}
    for policy in release.of_kind("CapacityPolicy"):
        spec = policy["spec"]
        assert spec["scaleTargetRef"] == {
            "apiVersion": "ray.io/v1",
            "kind": "RayService",
            "name": FULLNAME,
            "deployment": spec["pool"],
        }
        assert spec["pool"] in deployments
        group = release.worker_group(spec["pool"])
        assert (spec["minReplicas"], spec["maxReplicas"]) == (
            group["minReplicas"],
            group["maxReplicas"],
        )
        assert spec["metrics"]["scrape"]["endpoints"] == [
            f"http://{FULLNAME}-router.{NAMESPACE}.svc.cluster.local:8000/metrics"
        ]


@value_sets
def test_network_policies_admit_every_baton_pod(value_set: str) -> None:
    release = render(value_set)
    for policy in release.of_kind("NetworkPolicy"):
        ((peer,),) = [rule["from"] for rule in policy["spec"]["ingress"]]
        assert peer == {"podSelector": {"matchLabels": SELECTOR}}
    for where, _ in pod_specs(release):
        if where.startswith("RayService"):
            group = where.rsplit("/", 1)[1]
            template = dict(ray_templates(release.rayservice))[group]
            assert template["metadata"]["labels"].items() >= SELECTOR.items(), where


@value_sets
def test_router_service_selects_the_router_pods(value_set: str) -> None:
    release = render(value_set)
    service = release.get("Service", f"{FULLNAME}-router")
    pods = release.worker_group("router")["template"]["metadata"]["labels"]
    assert pods.items() >= service["spec"]["selector"].items()
    selector = service["spec"]["selector"].items()
    others = [t for g, t in ray_templates(release.rayservice) if g != "router"]
    assert not any(t["metadata"]["labels"].items() >= selector for t in others)
    assert [(p["name"], p["port"]) for p in service["spec"]["ports"]] == [
        ("http", 8000),
        ("grpc", 50051),
    ]


@pytest.mark.parametrize("http_port", [8000, 8100])
def test_ray_pods_declare_the_ports_kuberay_reads(http_port: int) -> None:
    """KubeRay checks Serve's proxy at the Ray container's port named `serve`, 8000 when
    there is none: the readiness probe of worker pods and the head's serve label. It builds
    the head Service from the head's ports alone, and deploys the Serve config through its
    `dashboard` port, so the head declares every port of KubeRay's defaults."""
    release = render_values({"router": {"httpPort": http_port}})
    declared = {}
    for group, template in ray_templates(release.rayservice):
        (container,) = template["spec"]["containers"]
        declared[group] = {p["name"]: p["containerPort"] for p in container["ports"]}
    worker = {"metrics": 8080, "serve": http_port}
    assert declared == {
        "head": {"gcs-server": 6379, "dashboard": 8265, "client": 10001, **worker},
        "router": {**worker, "grpc": 50051},
        "prefill": worker,
        "decode": worker,
    }
    # The router Service reaches the ports the router pods declare.
    service = release.get("Service", f"{FULLNAME}-router")
    targets = {p["name"]: declared["router"][p["targetPort"]] for p in service["spec"]["ports"]}
    assert targets == {"http": http_port, "grpc": 50051}


def test_api_keys_reach_the_router_and_the_tests() -> None:
    release = render("cluster-wide")
    secret = release.get("Secret", f"{FULLNAME}-api-keys")
    keys = base64.b64decode(secret["data"]["api-keys"]).decode()
    assert keys == "sk-team-a-0123456789abcdef,sk-team-b-0123456789abcdef"
    (router,) = release.worker_group("router")["template"]["spec"]["containers"]
    ref = {"secretKeyRef": {"name": f"{FULLNAME}-api-keys", "key": "api-keys"}}
    assert {"name": "BATON_API_KEYS", "valueFrom": ref} in router["env"]
    generated = render("default").get("Secret", f"{FULLNAME}-api-keys")
    assert base64.b64decode(generated["data"]["api-keys"]).decode().startswith("sk-baton-")


def test_inference_pool_selects_the_router_pods() -> None:
    release = render("cluster-wide")
    (pool,) = release.of_kind("InferencePool")
    router_pods = release.worker_group("router")["template"]["metadata"]["labels"]
    assert router_pods.items() >= pool["spec"]["selector"]["matchLabels"].items()
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert pool["spec"]["endpointPickerRef"]["name"] == "baton-epp"


def test_notes_check_for_kuberay() -> None:
    notes = render("default").notes
    # Offline, the RayService CRD lookup finds nothing, as on a cluster without KubeRay.
    assert "KubeRay's RayService CRD (rayservices.ray.io, version v1) was not found" in notes
    assert f"kubectl port-forward -n {NAMESPACE} svc/{FULLNAME}-router 8000 50051" in notes


def test_readme_gpu_example_installs() -> None:
    """The values file shown in README.md's "Install on Kubernetes" renders and is admitted."""
    readme = (CHART_DIR.parents[1] / "README.md").read_text()
    section = readme.split("## Install on Kubernetes", 1)[1]
    block = section.split("# gpu.yaml", 1)[1].split("\n", 1)[1].split("```", 1)[0]
    release = render_values(yaml.safe_load(textwrap.dedent(block)))
    assert release.worker_group("decode")["rayStartParams"]["num-gpus"] == "1"
    assert release.get("StatefulSet", f"{FULLNAME}-kvstore")["spec"]["replicas"] == 3
    assert [e for o in release.objects for e in admission_errors(o)] == []


def test_operator_watches_extra_namespaces_with_a_role_in_each() -> None:
    release = render_values({"operator": {"watchNamespaces": ["llm-canary", NAMESPACE]}})
    roles = {
        (r["kind"], r["metadata"]["namespace"]) for r in release.objects if "Role" in r["kind"]
    }
    assert roles == {
        (kind, namespace)
        for kind in ("Role", "RoleBinding")
        for namespace in (NAMESPACE, "llm-canary")
    }
    args = _container(release.get("Deployment", f"{FULLNAME}-operator"))["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        f"--namespace={NAMESPACE}",
        "--namespace=llm-canary",
    ]
    for binding in release.of_kind("RoleBinding"):
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    assert [e for o in release.objects for e in admission_errors(o)] == []
