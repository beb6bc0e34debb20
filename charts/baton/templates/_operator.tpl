{{/* Namespaces the operator watches when not cluster-wide, as a JSON list: the release's first. */}}
{{- define "baton.operatorNamespaces" -}}
{{- prepend .Values.operator.watchNamespaces .Release.Namespace | uniq | toJson }}
{{- end }}

{{/* The operator's least-privilege rules (docs/capacitypolicy.md, "RBAC the operator needs"). */}}
{{- define "baton.operatorRules" -}}
# Watch policies; kopf's finalizer and progress annotations.
- apiGroups: [baton.dev]
  resources: [capacitypolicies]
  verbs: [get, list, watch, patch]
- apiGroups: [baton.dev]
  resources: [capacitypolicies/status]
  verbs: [get, patch]
# SuccessfulRescale and warning Events (kopf posts core v1 Events).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
# Read and rewrite num_replicas in spec.serveConfigV2.
- apiGroups: [ray.io]
  resources: [rayservices]
  verbs: [get, patch]
{{- range .Values.operator.scaleResources }}
# Policies that target a /scale subresource.
- apiGroups: [{{ .apiGroup | quote }}]
  resources: {{ toJson .resources }}
  verbs: [get, patch]
{{- end }}
{{- end }}
