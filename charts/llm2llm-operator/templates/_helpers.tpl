{{/* Names, labels and small helpers. */}}

{{- define "llm2llm-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The resource name prefix: the release name, suffixed with the chart name unless it already holds it. */}}
{{- define "llm2llm-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "llm2llm-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llm2llm-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "llm2llm-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "llm2llm-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: llm2llm
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "llm2llm-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llm2llm-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "llm2llm-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The RBAC rules of files/rbac-rules.yaml for this scope ("cluster" or "namespace"), as a YAML list. */}}
{{- define "llm2llm-operator.rbacRules" -}}
{{- $scope := index . 0 }}
{{- $root := index . 1 }}
{{- $file := $root.Files.Get "files/rbac-rules.yaml" | fromYaml }}
{{- $rules := $file.rules }}
{{- if $root.Values.peering.name }}
{{- $rules = concat $rules (ternary $file.peering.clusterwide $file.peering.namespaced (eq $scope "cluster")) }}
{{- end }}
{{- toYaml $rules }}
{{- end }}

{{/* A name that fits in 63 characters: unchanged when it does, else cut and suffixed with a hash of the whole. */}}
{{- define "llm2llm-operator.fit" -}}
{{- if le (len .) 63 }}
{{- . }}
{{- else }}
{{- printf "%s-%s" (trunc 54 . | trimSuffix "-") (sha256sum . | trunc 8) }}
{{- end }}
{{- end }}

{{/* ClusterRole(Binding) name: global, so it carries the release namespace. */}}
{{- define "llm2llm-operator.clusterRoleName" -}}
{{- include "llm2llm-operator.fit" (printf "%s-%s" .Release.Namespace (include "llm2llm-operator.fullname" .)) }}
{{- end }}
