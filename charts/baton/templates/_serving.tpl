{{/*
The ServingConfig (services/serving_config.py) of the Serve application, as YAML: the
`args` that `services.app:app_builder` receives. Every key is a ServingConfig field; the
chart's tests validate it with ServingConfig.model_validate.
*/}}
{{- define "baton.servingConfig" -}}
{{- $m := .Values.model -}}
mode: {{ .Values.mode | toJson }}
model:
  path: {{ $m.path | toJson }}
  served_name: {{ $m.servedName | toJson }}
  max_model_len: {{ int64 $m.maxModelLen }}
  dtype: {{ $m.dtype | toJson }}
  kernel_backend: {{ $m.kernelBackend | toJson }}
  device: {{ $m.device | toJson }}
prefill:
  {{- include "baton.poolConfig" .Values.pools.prefill | fromJson | toYaml | nindent 2 }}
decode:
  {{- include "baton.poolConfig" .Values.pools.decode | fromJson | toYaml | nindent 2 }}
kvstore:
  {{- $redisUrl := include "baton.redisUrl" . }}
  targets: {{ if include "baton.kvstoreEnabled" . }}{{ include "baton.kvstoreTargets" . }}{{ else }}[]{{ end }}
  redis_url: {{ if and (include "baton.kvstoreEnabled" .) $redisUrl }}{{ toJson $redisUrl }}{{ else }}null{{ end }}
  lease_ttl_s: {{ .Values.kvstore.leaseTtlSeconds | toJson }}
  timeout_s: {{ .Values.kvstore.timeoutSeconds | toJson }}
  {{- /* The token stays in its Secret, out of the RayService: each pod reads the file. */}}
  token: null
  token_file: {{ if include "baton.kvstoreAuth" . }}{{ printf "%s/token" (include "baton.kvstoreTokenDir" .) | toJson }}{{ else }}null{{ end }}
  tls: false
  tls_ca_file: null
  tls_cert_file: null
  tls_key_file: null
router:
  host: "0.0.0.0"
  http_port: {{ int .Values.router.httpPort }}
  grpc_port: {{ int .Values.router.grpcPort }}
  local_prefill_threshold: {{ int .Values.router.localPrefillThreshold }}
  request_timeout_s: {{ .Values.router.requestTimeoutSeconds | toJson }}
  prefill_timeout_s: {{ .Values.router.prefillTimeoutSeconds | toJson }}
  stall_timeout_s: {{ .Values.router.stallTimeoutSeconds | toJson }}
  drain_timeout_s: {{ .Values.router.drainTimeoutSeconds | toJson }}
  max_inflight_requests: {{ int .Values.router.maxInflightRequests }}
  max_remote_prefills: {{ .Values.router.maxRemotePrefills | toJson }}
  max_request_bytes: {{ int .Values.router.maxRequestBytes }}
  {{- /* The router listens on 0.0.0.0: without API keys it starts only when told to. */}}
  allow_unauthenticated: {{ not .Values.apiKeys.enabled }}
{{- end }}

{{/* One pool's ServingConfig section, as a JSON object. */}}
{{- define "baton.poolConfig" -}}
{{- toJson (dict
  "replicas" (int .replicas)
  "linear" .linear
  "lm_head_linear" .lmHeadLinear
  "kv_cache_bytes" (int64 .kvCacheBytes)
  "kv_cache_dtype" .kvCacheDtype
  "max_num_seqs" (int .maxNumSeqs)
  "max_num_batched_tokens" (int .maxNumBatchedTokens)
  "batch_invariant" .batchInvariant
  "torch_threads" .torchThreads
  "prefill_threads" .prefillThreads
  "drain_timeout_s" .drainTimeoutSeconds
  "num_cpus" .cpus
  "num_gpus" .gpus) }}
{{- end }}

{{/*
Ray actor options of a Serve deployment: its CPUs and GPUs plus one unit of the custom
resource that only its own worker group offers, so each replica lands on a pod of its
group, one replica per pod. They replace the options the code sets.
`include "baton.actorOptions" (list "prefill" cpus gpus)`
*/}}
{{- define "baton.actorOptions" -}}
{{- toJson (dict "num_cpus" (index . 1) "num_gpus" (index . 2) "resources" (dict (include "baton.rayResource" (index . 0)) 1)) }}
{{- end }}

{{/*
The Ray Serve config (KubeRay's serveConfigV2). The CapacityPolicy operator rewrites the
pools' num_replicas here; Ray's autoscaler then adds or removes their worker pods.
*/}}
{{- define "baton.serveConfig" -}}
proxy_location: EveryNode
http_options:
  host: "0.0.0.0"
  port: {{ int .Values.router.httpPort }}
applications:
  - name: baton
    route_prefix: /
    import_path: services.app:app_builder
    args:
      {{- include "baton.servingConfig" . | nindent 6 }}
    deployments:
      - name: router
        num_replicas: {{ int .Values.router.replicas }}
        ray_actor_options: {{ include "baton.actorOptions" (list "router" .Values.router.cpus 0) }}
      {{- range $pool := splitList " " (include "baton.poolNames" .) }}
      {{- $v := index $.Values.pools $pool }}
      - name: {{ $pool }}
        num_replicas: {{ int $v.replicas }}
        ray_actor_options: {{ include "baton.actorOptions" (list $pool $v.cpus $v.gpus) }}
      {{- end }}
{{- end }}
