{{/*
The pod template of a Ray node (head or worker group). KubeRay fills in the container's
command (`ray start ...` from rayStartParams) and, where none is given, the probes.
`include "baton.rayPodTemplate" (dict "root" $ "component" "decode" "section" $values
  "containerName" "ray-worker" "resources" $resources "env" $env "readinessProbe" $probe
  "ports" $ports "model" true "kvstoreToken" true)`
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
        {{- toYaml . | nindent 8 }}
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
