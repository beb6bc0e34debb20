{{/*
Checks that span several values, which values.schema.json cannot express: each would
otherwise render objects the API server refuses halfway through an install, or that run
but cannot work. rayservice.yaml includes it, so every install runs it.
*/}}
{{- define "baton.validate" -}}
{{- range $pool := splitList " " (include "baton.poolNames" .) }}
{{- $v := index $.Values.pools $pool }}
{{- $gpuLimit := ternary (dict $v.gpuResourceName (printf "pools.%s.gpus" $pool)) dict (gt (int $v.gpus) 0) }}
{{- include "baton.validateResources" (list (printf "pools.%s" $pool) (include "baton.poolResources" $v | fromYaml) $gpuLimit) }}
{{- if gt (int $v.minReplicas) (int $v.maxReplicas) }}
{{- fail (printf "pools.%s.minReplicas (%d) must be less than or equal to maxReplicas (%d)" $pool (int $v.minReplicas) (int $v.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $v.replicas) (int $v.minReplicas)) (gt (int $v.replicas) (int $v.maxReplicas)) }}
{{- fail (printf "pools.%s.replicas (%d) must lie within minReplicas (%d) and maxReplicas (%d)" $pool (int $v.replicas) (int $v.minReplicas) (int $v.maxReplicas)) }}
{{- end }}
{{- /* The operator may shrink the pool to minReplicas, where a larger budget blocks every eviction. */}}
{{- $pdb := $v.podDisruptionBudget }}
{{- if and $pdb.enabled (not (kindIs "invalid" $pdb.minAvailable)) (ge (int $pdb.minAvailable) (int $v.minReplicas)) }}
{{- fail (printf "pools.%s.podDisruptionBudget.minAvailable (%d) must be less than pools.%s.minReplicas (%d): otherwise no %s pod can be evicted once the pool is at minReplicas and node drains hang" $pool (int $pdb.minAvailable) $pool (int $v.minReplicas) $pool) }}
{{- end }}
{{- if and $.Values.operator.enabled $v.capacityPolicy.enabled }}
{{- include "baton.validatePolicy" (list $pool $v.capacityPolicy) }}
{{- /* Without Ray's autoscaler KubeRay keeps `replicas` worker pods, one Serve replica each. */}}
{{- if and (not $.Values.ray.autoscaler.enabled) (lt (int $v.replicas) (int $v.maxReplicas)) }}
{{- fail (printf "ray.autoscaler.enabled is false, so the worker group of pools.%s stays at replicas (%d) pods, but the operator may raise its Serve replicas to maxReplicas (%d), which could never be placed: enable ray.autoscaler, set pools.%s.replicas to maxReplicas (a fixed-size group), or set pools.%s.capacityPolicy.enabled=false" $pool (int $v.replicas) (int $v.maxReplicas) $pool $pool) }}
{{- end }}
{{- end }}
{{- end }}
{{- $router := .Values.router }}
{{- $components := dict "ray.head" .Values.ray.head.resources "router" $router.resources }}
{{- if include "baton.kvstoreEnabled" . }}
{{- $_ := set $components "kvstore" .Values.kvstore.resources }}
{{- if .Values.redis.enabled }}
{{- $_ := set $components "redis" .Values.redis.resources }}
{{- end }}
{{- end }}
{{- if .Values.operator.enabled }}
{{- $_ := set $components "operator" .Values.operator.resources }}
{{- end }}
{{- range $where, $resources := $components }}
{{- include "baton.validateResources" (list $where $resources) }}
{{- end }}
{{- if and $router.podDisruptionBudget.enabled (not (kindIs "invalid" $router.podDisruptionBudget.minAvailable)) (ge (int $router.podDisruptionBudget.minAvailable) (int $router.replicas)) }}
{{- fail (printf "router.podDisruptionBudget.minAvailable (%d) must be less than router.replicas (%d): otherwise no router pod can ever be evicted and node drains hang" (int $router.podDisruptionBudget.minAvailable) (int $router.replicas)) }}
{{- end }}
{{- /* Serve's proxy binds router.httpPort in every Ray pod (proxy_location EveryNode), the
router replica router.grpcPort in its pod: beside the ports Ray binds there. */}}
{{- $http := dict "name" "router.httpPort" "low" (int $router.httpPort) }}
{{- $grpc := dict "name" "router.grpcPort" "low" (int $router.grpcPort) }}
{{- $headPorts := prepend (include "baton.rayPorts" (list . "head") | fromJsonArray) $http }}
{{- include "baton.validatePorts" (list "Ray head pod" $headPorts) }}
{{- $workerPorts := concat (list $http $grpc) (include "baton.rayPorts" (list . "worker") | fromJsonArray) }}
{{- include "baton.validatePorts" (list "Ray worker pods" $workerPorts) }}
{{- if include "baton.kvstoreEnabled" . }}
{{- $kvPorts := list (dict "name" "kvstore.port" "low" (int .Values.kvstore.port)) (dict "name" "kvstore.metricsPort" "low" (int .Values.kvstore.metricsPort)) }}
{{- include "baton.validatePorts" (list "KV store pods" $kvPorts) }}
{{- end }}
{{- $mounts := list "/dev/shm" "/tmp" (include "baton.kvstoreTokenDir" .) }}
{{- if and .Values.model.volume (has (clean .Values.model.mountPath) $mounts) }}
{{- fail (printf "model.mountPath (%s) is already mounted in the Ray pods: use a path other than %s" .Values.model.mountPath (printf "%s and %s" (join ", " (initial $mounts)) (last $mounts))) }}
{{- end }}
{{- if and (include "baton.kvstoreEnabled" .) (gt (int .Values.kvstore.shards) 1) (not (include "baton.redisConfigured" .)) }}
{{- fail "kvstore.shards > 1 needs a prefix index the shards share: set redis.enabled, redis.external.url or redis.external.existingSecret" }}
{{- end }}
{{- /* Decode reads the blocks prefill writes: both pools cache KV alike ("fp8" is "fp8_e4m3"). */}}
{{- $prefillKV := replace "fp8_e4m3" "fp8" .Values.pools.prefill.kvCacheDtype }}
{{- $decodeKV := replace "fp8_e4m3" "fp8" .Values.pools.decode.kvCacheDtype }}
{{- if and (eq .Values.mode "disaggregated") (ne $prefillKV $decodeKV) }}
{{- fail (printf "pools.prefill.kvCacheDtype (%s) and pools.decode.kvCacheDtype (%s) differ: decode reads the KV blocks prefill writes, so both pools must cache KV alike" .Values.pools.prefill.kvCacheDtype .Values.pools.decode.kvCacheDtype) }}
{{- end }}
{{- if and .Values.inferencePool.enabled (not .Values.inferencePool.endpointPicker.name) }}
{{- fail "inferencePool.enabled needs inferencePool.endpointPicker.name: the Service of the endpoint picker you deploy" }}
{{- end }}
{{- end }}

{{/*
A container's resources: no request above its limit, and an extended resource requested
exactly as limited, or the API server would refuse the pod at admission, once the install
is under way. `limitFields` optionally names, per resource, the value that sets its limit
when that is not `<where>.resources.limits.<resource>`.
`include "baton.validateResources" (list "router" $.Values.router.resources)`
`include "baton.validateResources" (list "pools.decode" $resources (dict "nvidia.com/gpu" "pools.decode.gpus"))`
*/}}
{{- define "baton.validateResources" -}}
{{- $where := index . 0 }}
{{- $resources := index . 1 | default dict }}
{{- $limitFields := dict }}
{{- if gt (len .) 2 }}{{ $limitFields = index . 2 }}{{ end }}
{{- $limits := $resources.limits | default dict }}
{{- range $name, $request := $resources.requests | default dict }}
{{- $requestField := printf "%s.resources.requests.%s" $where $name }}
{{- $limitField := get $limitFields $name | default (printf "%s.resources.limits.%s" $where $name) }}
{{- /* Kubernetes overcommits only its own resources (no domain, or kubernetes.io/), hugepages
aside: the rest, extended resources such as nvidia.com/gpu, cannot be requested below their limit. */}}
{{- $overcommit := and (or (not (contains "/" $name)) (contains "kubernetes.io/" $name)) (not (hasPrefix "hugepages-" $name)) }}
{{- if hasKey $limits $name }}
{{- $limit := get $limits $name }}
{{- $requested := include "baton.quantity" $request | float64 }}
{{- $limited := include "baton.quantity" $limit | float64 }}
{{- if and (not $overcommit) (ne $requested $limited) }}
{{- fail (printf "%s (%v) must equal %s (%v): Kubernetes cannot overcommit %s, so it refuses a pod whose request differs from its limit; leave the request out and it defaults to the limit" $requestField $request $limitField $limit $name) }}
{{- else if gt $requested $limited }}
{{- fail (printf "%s (%v) must not exceed %s (%v): Kubernetes refuses a pod that requests more than its limit" $requestField $request $limitField $limit) }}
{{- end }}
{{- else if not $overcommit }}
{{- fail (printf "%s (%v) needs a limit, %s: Kubernetes cannot overcommit %s, so it refuses a request without a limit; set the limit alone and the request defaults to it" $requestField $request $limitField $name) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Ports that the processes of one pod bind: fails naming the first two that overlap. Each
is a dict of "name" and "low", plus "high" for a range.
`include "baton.validatePorts" (list "KV store pods" $ports)`
*/}}
{{- define "baton.validatePorts" -}}
{{- $pod := index . 0 }}
{{- $ports := index . 1 }}
{{- range $i, $a := $ports }}
{{- range $b := slice $ports (add1 $i) }}
{{- if and (le (int $a.low) (int ($b.high | default $b.low))) (le (int $b.low) (int ($a.high | default $a.low))) }}
{{- fail (printf "%s and %s clash in the %s: each needs a port of its own" (include "baton.portName" $a) (include "baton.portName" $b) $pod) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{- define "baton.portName" -}}
{{- if and .high (ne (int .high) (int .low)) }}
{{- printf "%s (%d-%d)" .name (int .low) (int .high) }}
{{- else }}
{{- printf "%s (%d)" .name (int .low) }}
{{- end }}
{{- end }}

{{/*
The CapacityPolicy CRD's CEL rules on the fields a pool's values pass through, with the
CRD's messages (values.schema.json holds the rest of its schema: tests/chart/policy_schema.py).
`include "baton.validatePolicy" (list "decode" $values.pools.decode.capacityPolicy)`
*/}}
{{- define "baton.validatePolicy" -}}
{{- $pool := index . 0 }}
{{- $policy := index . 1 }}
{{- $where := printf "pools.%s.capacityPolicy" $pool }}
{{- $objectives := $policy.objectives | default dict }}
{{- $capacity := $policy.capacity | default dict }}
{{- if and (ne $pool "prefill") (hasKey $objectives "ttftP90Ms") }}
{{- fail (printf "%s: objectives.ttftP90Ms applies to the prefill pool only" $where) }}
{{- end }}
{{- if and (ne $pool "decode") (or (hasKey $objectives "itlP90Ms") (hasKey $objectives "kvCacheUtilization")) }}
{{- fail (printf "%s: objectives.itlP90Ms and objectives.kvCacheUtilization apply to the decode pool only" $where) }}
{{- end }}
{{- if and (ne $pool "decode") (hasKey $capacity "sequencesPerReplica") }}
{{- fail (printf "%s: capacity.sequencesPerReplica applies to the decode pool only" $where) }}
{{- end }}
{{- if not (or $objectives (hasKey $capacity "tokensPerSecondPerReplica") (hasKey $capacity "sequencesPerReplica")) }}
{{- fail (printf "%s: set at least one objective or capacity hint: nothing would drive scaling" $where) }}
{{- end }}
{{- $metrics := $policy.metrics | default dict }}
{{- range $source := list "prometheus" "scrape" }}
{{- if and (eq (toString $metrics.source) $source) (not (hasKey $metrics $source)) }}
{{- fail (printf "%s: metrics.%s is required when metrics.source is %s" $where $source $source) }}
{{- end }}
{{- end }}
{{- $behavior := $policy.behavior | default dict }}
{{- range $direction := list "scaleUp" "scaleDown" }}
{{- $rules := get $behavior $direction | default dict }}
{{- if and (hasKey $rules "policies") (not $rules.policies) (ne (toString $rules.selectPolicy) "Disabled") }}
{{- fail (printf "%s: behavior.%s.policies must not be empty unless selectPolicy is Disabled" $where $direction) }}
{{- end }}
{{- end }}
{{- range $i, $step := (get $behavior "scaleDown" | default dict).policies }}
{{- if and (eq $step.type "Percent") (gt (int $step.value) 100) }}
{{- fail (printf "%s: behavior.scaleDown.policies[%d]: a Percent policy cannot exceed 100 (got %d)" $where $i (int $step.value)) }}
{{- end }}
{{- end }}
{{- end }}
