{{/*
Names. The full name is cut to 40 characters: KubeRay derives RayCluster, pod and Service
names from the RayService's name, and StatefulSet pods add "-<ordinal>" plus a 10-character
revision hash label; 40 keeps every derived name within Kubernetes' 63.
*/}}
{{- define "baton.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "baton.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "baton.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* "<fullname>-<component>": `include "baton.componentName" (list $ "kvstore")` */}}
{{- define "baton.componentName" -}}
{{- printf "%s-%s" (include "baton.fullname" (index . 0)) (index . 1) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels. */}}
{{- define "baton.selectorLabels" -}}
app.kubernetes.io/name: {{ include "baton.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "baton.labels" -}}
helm.sh/chart: {{ include "baton.chart" . }}
{{ include "baton.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: baton
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* `include "baton.componentLabels" (list $ "kvstore")` */}}
{{- define "baton.componentLabels" -}}
{{ include "baton.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{- define "baton.componentSelectorLabels" -}}
{{ include "baton.selectorLabels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* Pod template metadata of a component: labels, podLabels, podAnnotations. */}}
{{- define "baton.podMetadata" -}}
{{- $root := index . 0 -}}
labels:
  {{- include "baton.componentLabels" . | nindent 2 }}
  {{- with $root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with $root.Values.podAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Scheduling fields of a pod spec from a values section with nodeSelector, tolerations, affinity. */}}
{{- define "baton.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "baton.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The Baton image: repository:tag, the tag defaulting to appVersion (+ "-cuda"). */}}
{{- define "baton.image" -}}
{{- $suffix := ternary "-cuda" "" (eq .Values.image.flavor "cuda") }}
{{- $tag := .Values.image.tag | default (printf "%s%s" .Chart.AppVersion $suffix) }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/*
A Kubernetes quantity ("500m", "2", "1.5Gi", "1500Mi", "1e9", or a number) as a float, in
the resource's unit (cores, bytes, ...), with the API server's suffixes: n u m k M G T P E,
Ki Mi Gi Ti Pi Ei, or a decimal exponent.
*/}}
{{- define "baton.quantity" -}}
{{- $quantity := toString . }}
{{- $suffixes := dict "n" 1e-9 "u" 1e-6 "m" 1e-3 "" 1 "k" 1e3 "M" 1e6 "G" 1e9 "T" 1e12 "P" 1e15 "E" 1e18 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "Ei" 1152921504606846976 }}
{{- $number := regexFind "^([0-9]+(\\.[0-9]*)?|\\.[0-9]+)" $quantity }}
{{- $suffix := trimPrefix $number $quantity }}
{{- if and $number (hasKey $suffixes $suffix) }}
{{- mulf $number (get $suffixes $suffix) }}
{{- else if and $number (regexMatch "^[eE][+-]?[0-9]+$" $suffix) }}
{{- float64 $quantity }}
{{- else }}
{{- fail (printf "cannot read %q as a Kubernetes quantity: use a number with an optional suffix, such as 500m, 2, 1.5Gi or 512Mi" $quantity) }}
{{- end }}
{{- end }}

{{/*
Bytes in a Kubernetes memory quantity ("4Gi", "512Mi", "1.5G", "1048576"), as an integer.
*/}}
{{- define "baton.bytes" -}}
{{- include "baton.quantity" . | float64 | floor | int64 }}
{{- end }}

{{/* The operator's ServiceAccount. */}}
{{- define "baton.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "baton.componentName" (list . "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Pools that this release deploys, in order: prefill (disaggregated mode only), decode. */}}
{{- define "baton.poolNames" -}}
{{- if eq .Values.mode "disaggregated" }}prefill {{ end }}decode
{{- end }}

{{/* Whether the KV store (and so Redis) is deployed: only disaggregated mode moves KV. */}}
{{- define "baton.kvstoreEnabled" -}}
{{- if eq .Values.mode "disaggregated" }}true{{ end }}
{{- end }}

{{/* The headless Service and StatefulSet of the KV store share this name. */}}
{{- define "baton.kvstoreName" -}}
{{- include "baton.componentName" (list . "kvstore") }}
{{- end }}

{{/* "<pod>.<service>.<namespace>.svc.<domain>": `include "baton.kvstoreDomain" $` is the part after <pod>. */}}
{{- define "baton.kvstoreDomain" -}}
{{- printf "%s.%s.svc.%s" (include "baton.kvstoreName" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* Every shard's stable address, as a JSON list: the ServingConfig's kvstore.targets. */}}
{{- define "baton.kvstoreTargets" -}}
{{- $targets := list }}
{{- range $ordinal := until (int .Values.kvstore.shards) }}
{{- $targets = append $targets (printf "%s-%d.%s:%d" (include "baton.kvstoreName" $) $ordinal (include "baton.kvstoreDomain" $) (int $.Values.kvstore.port)) }}
{{- end }}
{{- toJson $targets }}
{{- end }}

{{/* The bundled Redis's URL, or the external one given as a plain URL; empty otherwise. */}}
{{- define "baton.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s.%s.svc.%s:6379/0" (include "baton.componentName" (list . "redis")) .Release.Namespace .Values.clusterDomain }}
{{- else }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* Whether the shards share a Redis prefix index. */}}
{{- define "baton.redisConfigured" -}}
{{- if or .Values.redis.enabled .Values.redis.external.url .Values.redis.external.existingSecret }}true{{ end }}
{{- end }}

{{/* The Secret holding the router's API keys (key `api-keys`). */}}
{{- define "baton.apiKeysSecretName" -}}
{{- default (include "baton.componentName" (list . "api-keys")) .Values.apiKeys.existingSecret }}
{{- end }}

{{/* Whether the KV store requires its shared token (a KV store is deployed and auth is on). */}}
{{- define "baton.kvstoreAuth" -}}
{{- if and (include "baton.kvstoreEnabled" .) .Values.kvstore.auth.enabled }}true{{ end }}
{{- end }}

{{/* The Secret holding the KV store token (key `token`). */}}
{{- define "baton.kvstoreTokenSecretName" -}}
{{- default (include "baton.componentName" (list . "kvstore-token")) .Values.kvstore.auth.existingSecret }}
{{- end }}

{{/* Where the KV store token's Secret is mounted, in the shards and the Ray pods. */}}
{{- define "baton.kvstoreTokenDir" -}}
/etc/baton/kvstore-token
{{- end }}

{{/* The name of the custom Ray resource that pins a Serve deployment to its worker group. */}}
{{- define "baton.rayResource" -}}
{{- printf "baton_%s" . }}
{{- end }}
