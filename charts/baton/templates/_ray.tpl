{{/*
The pod template of a Ray node (head or worker group). KubeRay fills in the container's
command (`ray start ...` from rayStartParams) and each probe not given here (as YAML).
`include "baton.rayPodTemplate" (dict "root" $ "component" "decode" "section" $values
  "containerName" "ray-worker" "resources" $resources "env" $env "readinessProbe" $probe
  "livenessProbe" $probe "ports" $ports "model" true "kvstoreToken" true)`
`kvstoreToken` mounts the KV store token's Secret (when the KV store requires one).
*/}}
{{- define "baton.rayPodTemplate" -}}
{{- $root := .root -}}
metadata:
  {{- include "baton.podMetadata" (list $root .component) | nindent 2 }}
spec:
  {{- with include "baton.imagePullSecrets" $root }}{{ . | nindent 2 }}{{ end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  {{- with include "baton.scheduling" .section }}{{ . | nindent 2 }}{{ end }}
  {{- /* Kubernetes must not kill a draining replica before its drain can end. */}}
  {{- with .section.drainTimeoutSeconds }}
  terminationGracePeriodSeconds: {{ add (int .) 30 }}
  {{- end }}
  containers:
    - name: {{ .containerName }}
      image: {{ include "baton.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- /* The root filesystem is read-only: Ray, torch and Triton keep caches under $HOME. */}}
      env:
        - name: HOME
          value: /tmp
        {{- with .env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .ports }}
      ports:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .readinessProbe }}
      readinessProbe:
        {{- . | nindent 8 }}
      {{- end }}
      {{- with .livenessProbe }}
      livenessProbe:
        {{- . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml .resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - name: shm
          mountPath: /dev/shm
        - name: tmp
          mountPath: /tmp
        {{- if and .model $root.Values.model.volume }}
        - name: model
          mountPath: {{ $root.Values.model.mountPath }}
          readOnly: true
        {{- end }}
        {{- if and .kvstoreToken (include "baton.kvstoreAuth" $root) }}
        - name: kvstore-token
          mountPath: {{ include "baton.kvstoreTokenDir" $root }}
          readOnly: true
        {{- end }}
  {{- /* Ray's object store lives in /dev/shm, of which a container gets 64 MiB by default. */}}
  volumes:
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $root.Values.ray.shmSize }}
    - name: tmp
      emptyDir: {}
    {{- if and .model $root.Values.model.volume }}
    - name: model
      {{- toYaml $root.Values.model.volume | nindent 6 }}
    {{- end }}
    {{- if and .kvstoreToken (include "baton.kvstoreAuth" $root) }}
    - name: kvstore-token
      secret:
        secretName: {{ include "baton.kvstoreTokenSecretName" $root }}
        defaultMode: 0440
    {{- end }}
{{- end }}

{{/*
`ray start` flags of a worker group: its CPUs and GPUs, and the custom resource that pins
its Serve deployment to it. KubeRay writes `--resources=<value>` into a shell command, so
the value is the JSON map quoted once more (KubeRay's documented form).
`include "baton.workerStartParams" (list "decode" cpus gpus)`
*/}}
{{- define "baton.workerStartParams" -}}
num-cpus: {{ index . 1 | float64 | ceil | int | toString | quote }}
num-gpus: {{ index . 2 | int | toString | quote }}
resources: {{ toJson (toJson (dict (include "baton.rayResource" (index . 0)) 1)) | squote }}
{{- end }}

{{/* A pool's container resources: the values' resources plus its GPU limit. */}}
{{- define "baton.poolResources" -}}
{{- $resources := deepCopy (.resources | default dict) }}
{{- if gt (int .gpus) 0 }}
{{- $limits := deepCopy (get $resources "limits" | default dict) }}
{{- $_ := set $limits .gpuResourceName (int .gpus) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/*
The ports Ray binds in the head pod or in a worker pod, as a JSON list of {name, low,
high}, plus "portName", the container port name KubeRay looks them up by, where it has
one: KubeRay's and Ray's defaults, unless the head's rayStartParams set them (a worker's
flags are the chart's: "baton.workerStartParams"). Ports Ray picks at random are left
out. `include "baton.rayPorts" (list $ "head")`
*/}}
{{- define "baton.rayPorts" -}}
{{- $head := eq (index . 1) "head" }}
{{- $params := ternary (index . 0).Values.ray.head.rayStartParams dict $head }}
{{- $where := ternary "ray.head.rayStartParams." "ray start --" $head }}
{{- $flags := list
  (list "dashboard-agent-listen-port" "dashboard agent" (int (include "baton.rayAgentPort" .)) "")
  (list "metrics-export-port" "metrics export port" 8080 "metrics")
  (list "node-manager-port" "node manager" 0 "")
  (list "object-manager-port" "object manager" 0 "")
  (list "dashboard-agent-grpc-port" "dashboard agent's gRPC port" 0 "")
  (list "runtime-env-agent-port" "runtime env agent" 0 "") }}
{{- if $head }}
{{- $flags = concat (list
  (list "port" "GCS server" 6379 "gcs-server")
  (list "dashboard-port" "dashboard" 8265 "dashboard")
  (list "ray-client-server-port" "client server" 10001 "client")) $flags }}
{{- end }}
{{- $ports := list }}
{{- range $flag := $flags }}
{{- $port := int (get $params (index $flag 0) | default (index $flag 2)) }}
{{- if gt $port 0 }}
{{- $name := printf "Ray's %s, %s%s" (index $flag 1) $where (index $flag 0) }}
{{- $ports = append $ports (dict "name" $name "low" $port "high" $port "portName" (index $flag 3)) }}
{{- end }}
{{- end }}
{{- $low := int (get $params "min-worker-port" | default 10002) }}
{{- if gt $low 0 }}
{{- $name := printf "Ray's worker ports, %smin-worker-port to %smax-worker-port" $where $where }}
{{- $ports = append $ports (dict "name" $name "low" $low "high" (int (get $params "max-worker-port" | default 19999))) }}
{{- end }}
{{- toJson $ports }}
{{- end }}

{{/*
The named container ports of the Ray container in the head pod or in a worker pod, as a
JSON list. KubeRay finds Serve's proxy by the port named "serve", 8000 when none is: the
readiness probe it gives worker pods and the health check that lets the head pod serve
both call it there. On the head, the ports declared replace KubeRay's defaults in the head
Service, through whose "dashboard" port KubeRay deploys the Serve applications; so the
head declares every port of those defaults, with the numbers rayStartParams give them.
`include "baton.rayContainerPorts" (list $ "head")`
*/}}
{{- define "baton.rayContainerPorts" -}}
{{- $ports := list }}
{{- range $port := include "baton.rayPorts" . | fromJsonArray }}
{{- with $port.portName }}
{{- $ports = append $ports (dict "name" . "containerPort" (int $port.low) "protocol" "TCP") }}
{{- end }}
{{- end }}
{{- $serve := dict "name" "serve" "containerPort" (int (index . 0).Values.router.httpPort) "protocol" "TCP" }}
{{- toJson (append $ports $serve) }}
{{- end }}

{{/*
The port of Ray's dashboard agent in a worker pod (Ray's default: the chart's worker
`ray start` flags leave it), where the raylet's health is asked: /api/local_raylet_healthz.
*/}}
{{- define "baton.rayAgentPort" -}}
52365
{{- end }}
