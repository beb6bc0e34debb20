{{/*
A probe: the chart's check (a dict holding one handler: grpc, httpGet or exec) with the
thresholds a values section gives it, as YAML.
`include "baton.probe" (list (dict "grpc" (dict "port" 50052)) .Values.kvstore.livenessProbe)`
*/}}
{{- define "baton.probe" -}}
{{- toYaml (merge (deepCopy (index . 0)) (index . 1)) }}
{{- end }}

{{/*
The router pods' readiness check, as an exec handler (JSON). A readinessProbe set on a Ray
container replaces all of KubeRay's, so this repeats what KubeRay checks in a RayService's
worker pods (the raylet through the dashboard agent, and Serve's HTTP proxy at /-/healthz,
both with `wget | grep success`, as KubeRay runs them) and adds the router's gRPC server:
grpc.health.v1 Check of baton.v1.Inference, which the router answers NOT_SERVING while it
starts or drains. A Kubernetes probe runs one handler, so the gRPC check is a Python client
in the same command rather than a `grpc:` probe.
`include "baton.routerReadinessCheck" $`
*/}}
{{- define "baton.routerReadinessCheck" -}}
{{- $timeout := int .Values.router.readinessProbe.timeoutSeconds }}
{{- $wget := printf "wget --tries 1 -T %d -q -O- http://localhost:%%d/%%s | grep -q success" $timeout }}
{{- $grpc := printf `python -c 'import sys, grpc
from grpc_health.v1 import health_pb2 as pb, health_pb2_grpc
check = health_pb2_grpc.HealthStub(grpc.insecure_channel("127.0.0.1:%d")).Check
request = pb.HealthCheckRequest(service="baton.v1.Inference")
try:
    status = check(request, timeout=%d).status
except grpc.RpcError as e:
    sys.exit(f"router gRPC health: {e.code().name}")
if status != pb.HealthCheckResponse.SERVING:
    sys.exit("router gRPC health: " + pb.HealthCheckResponse.ServingStatus.Name(status))'` (int .Values.router.grpcPort) $timeout }}
{{- $checks := list
  (printf $wget (int (include "baton.rayAgentPort" .)) "api/local_raylet_healthz")
  (printf $wget (int .Values.router.httpPort) "-/healthz")
  $grpc }}
{{- toJson (dict "exec" (dict "command" (list "bash" "-c" (join " && " $checks)))) }}
{{- end }}
