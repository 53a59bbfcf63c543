{{/* Chart name, truncated to 63 chars. */}}
{{- define "tuneop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: the release name, plus the chart name unless it is already in there. */}}
{{- define "tuneop.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "tuneop.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "tuneop.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tuneop.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tuneop.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "tuneop.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "tuneop.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "tuneop.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "tuneop.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "tuneop.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The operator's permissions in the namespaces it works in (Role rules in namespaced mode,
ClusterRole rules cluster-wide). Exactly what the handlers and kopf use:
tests/contract/test_chart.py records every API call of operator scenarios and fails when a
verb is missing here, or granted here but never used.
*/}}
{{- define "tuneop.namespacedRules" -}}
# tuneop's resources: kopf watches them and patches finalizers/annotations; the reconcilers
# read them (an AdapterDeployment also reads the FineTuneJobs it serves) and write their status.
- apiGroups: [tuneop.dev]
  resources: [finetunejobs, adapterdeployments]
  verbs: [get, list, watch, patch]
- apiGroups: [tuneop.dev]
  resources: [finetunejobs/status, adapterdeployments/status]
  verbs: [patch]
# FineTuneJob children: Jobs (validate, train, Together upload/download), watched for their outcome.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# AdapterDeployment children: the vLLM Deployment (watched) and its optional HPA.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch]
- apiGroups: [autoscaling]
  resources: [horizontalpodautoscalers]
  verbs: [get, create, patch, delete]
# The resolved job config (<name>-config); dataset ConfigMaps are read.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# Headless Service of multi-node training; the vLLM Service.
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch]
# Pods: Job pods (termination messages), vLLM pods (watched: adapters are loaded into each).
- apiGroups: [""]
  resources: [pods]
  verbs: [list, watch]
# The training pod's log (progress).
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
# Dependencies that must exist before a pod starts. Secrets: read-only, and only `get`.
- apiGroups: [""]
  resources: [persistentvolumeclaims, secrets]
  verbs: [get]
# Events about tuneop's resources (kopf and the reconcilers).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end -}}
