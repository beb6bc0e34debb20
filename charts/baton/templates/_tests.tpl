{{/*
A `helm test` pod running `sh -c <script>` in the tests image (curl).
`include "baton.testPod" (dict "root" $ "name" "kuberay" "script" $script "env" $env "serviceAccountToken" true)`
*/}}
{{- define "baton.testPod" -}}
{{- $root := .root -}}
apiVersion: v1
kind: Pod
metadata:
  name: {{ include "baton.componentName" (list $root (printf "test-%s" .name)) }}
  labels:
    {{- include "baton.componentLabels" (list $root "test") | nindent 4 }}
  annotations:
    helm.sh/hook: test
    helm.sh/hook-delete-policy: before-hook-creation,hook-succeeded
spec:
  restartPolicy: Never
  automountServiceAccountToken: {{ .serviceAccountToken | default false }}
  enableServiceLinks: false
  {{- with include "baton.imagePullSecrets" $root }}{{ . | nindent 2 }}{{ end }}
  securityContext:
    {{- /* The curl image's user is a name, which runAsNonRoot cannot check: give the uid. */}}
    {{- toYaml (merge (dict "runAsUser" 100 "runAsGroup" 101) $root.Values.podSecurityContext) | nindent 4 }}
  containers:
    - name: {{ .name }}
      image: {{ printf "%s:%s" $root.Values.tests.image.repository $root.Values.tests.image.tag }}
      imagePullPolicy: {{ $root.Values.tests.image.pullPolicy }}
      command: [sh, -c]
      args:
        - |
          {{- .script | nindent 10 }}
      {{- with .env }}
      env:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        requests: {cpu: 10m, memory: 16Mi}
        limits: {memory: 64Mi}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
{{- end }}
