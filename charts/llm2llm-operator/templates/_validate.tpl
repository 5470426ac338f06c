{{/*
Refuses values the operator could not run with. Included by validate.yaml, so every render checks them.
Each message names the key and says what is expected.
*/}}
{{- define "llm2llm-operator.validate" -}}
{{- $v := .Values }}
{{- $p := "llm2llm-operator: invalid values:" }}

{{- /* watchNamespaces: a list of distinct namespace names (DNS labels), no globs. */}}
{{- if not (kindIs "slice" $v.watchNamespaces) }}
{{- fail (printf "%s watchNamespaces must be a list of namespace names ([] for every namespace), got %s %v" $p (kindOf $v.watchNamespaces) $v.watchNamespaces) }}
{{- end }}
{{- $seen := dict }}
{{- range $i, $ns := $v.watchNamespaces }}
{{- if not (kindIs "string" $ns) }}
{{- fail (printf "%s watchNamespaces[%d] must be a string, got %s %v" $p $i (kindOf $ns) $ns) }}
{{- end }}
{{- if or (gt (len $ns) 63) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $ns)) }}
{{- fail (printf "%s watchNamespaces[%d] %q is not a namespace name (a DNS label: at most 63 lowercase letters, digits and '-', starting and ending with a letter or digit; no globs)" $p $i $ns) }}
{{- end }}
{{- if hasKey $seen $ns }}
{{- fail (printf "%s watchNamespaces[%d] %q is listed twice" $p $i $ns) }}
{{- end }}
{{- $_ := set $seen $ns true }}
{{- end }}

{{- /* The operator's settings. */}}
{{- $o := $v.operator }}
{{- if not (has $o.defaultLauncher (list "rayjob" "jobs-api")) }}
{{- fail (printf "%s operator.defaultLauncher must be one of [rayjob, jobs-api], got %q" $p (toString $o.defaultLauncher)) }}
{{- end }}
{{- if and (eq $o.defaultLauncher "jobs-api") (not $o.rayAddress) }}
{{- fail (printf "%s operator.defaultLauncher=jobs-api needs operator.rayAddress, the Ray dashboard address (e.g. http://ray-head-svc.ray:8265)" $p) }}
{{- end }}
{{- if and $o.rayAddress (not (regexMatch "^https?://[^/\\s]+" (toString $o.rayAddress))) }}
{{- fail (printf "%s operator.rayAddress must be an http(s):// dashboard address, got %q" $p (toString $o.rayAddress)) }}
{{- end }}
{{- if or (not (or (kindIs "float64" $o.reconcileInterval) (kindIs "int64" $o.reconcileInterval) (kindIs "int" $o.reconcileInterval))) (le (float64 $o.reconcileInterval) 0.0) }}
{{- fail (printf "%s operator.reconcileInterval must be a number of seconds > 0, got %v" $p $o.reconcileInterval) }}
{{- end }}
{{- if or (not (or (kindIs "float64" $o.workers) (kindIs "int64" $o.workers) (kindIs "int" $o.workers))) (lt (float64 $o.workers) 1.0) (ne (float64 $o.workers) (float64 (int64 $o.workers))) }}
{{- fail (printf "%s operator.workers must be an integer >= 1, got %v" $p $o.workers) }}
{{- end }}
{{- if and $o.baseDir (not (hasPrefix "/" (toString $o.baseDir))) }}
{{- fail (printf "%s operator.baseDir must be an absolute path, got %q" $p (toString $o.baseDir)) }}
{{- end }}
{{- if not $o.jobPython }}
{{- fail (printf "%s operator.jobPython must name the interpreter of the Ray pods (e.g. /opt/venv/bin/python)" $p) }}
{{- end }}
{{- range $key := list "allowedRayAddresses" "allowedClusterTemplates" }}
{{- $list := index $o $key }}
{{- if not (kindIs "slice" $list) }}
{{- fail (printf "%s operator.%s must be a list" $p $key) }}
{{- end }}
{{- range $i, $item := $list }}
{{- if or (not (kindIs "string" $item)) (not $item) (contains "," $item) }}
{{- fail (printf "%s operator.%s[%d] must be a non-empty string without commas, got %v" $p $key $i $item) }}
{{- end }}
{{- if and (eq $key "allowedRayAddresses") (not (regexMatch "^https?://[^/\\s@]+(/[^\\s@]*)?$" $item)) }}
{{- fail (printf "%s operator.allowedRayAddresses[%d] must be an http(s):// dashboard URL without user info, got %q" $p $i $item) }}
{{- end }}
{{- end }}
{{- end }}
{{- if not (kindIs "slice" $v.rbac.secretNamespaces) }}
{{- fail (printf "%s rbac.secretNamespaces must be a list of namespace names" $p) }}
{{- end }}
{{- range $i, $ns := $v.rbac.secretNamespaces }}
{{- if or (not (kindIs "string" $ns)) (not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" (toString $ns))) }}
{{- fail (printf "%s rbac.secretNamespaces[%d] %v is not a namespace name" $p $i $ns) }}
{{- end }}
{{- end }}
{{- if not (kindIs "slice" $o.extraArgs) }}
{{- fail (printf "%s operator.extraArgs must be a list of flags" $p) }}
{{- end }}

{{- /* Image, identity, replicas. */}}
{{- if not $v.image.repository }}
{{- fail (printf "%s image.repository must be set" $p) }}
{{- end }}
{{- if and (not $v.serviceAccount.create) (not $v.serviceAccount.name) }}
{{- fail (printf "%s serviceAccount.create=false needs serviceAccount.name (an existing ServiceAccount)" $p) }}
{{- end }}
{{- $replicas := int64 $v.replicaCount }}
{{- if lt $replicas 1 }}
{{- fail (printf "%s replicaCount must be >= 1, got %v" $p $v.replicaCount) }}
{{- end }}
{{- if and (gt $replicas 1) (not $v.peering.name) }}
{{- fail (printf "%s replicaCount=%d needs peering.name: a standalone operator must run as one replica, or two would reconcile the same runs" $p $replicas) }}
{{- end }}

{{- /* Ports. */}}
{{- range $key, $port := dict "health.port" $v.health.port "metrics.port" $v.metrics.port "metrics.service.port" $v.metrics.service.port }}
{{- if or (not (or (kindIs "float64" $port) (kindIs "int64" $port) (kindIs "int" $port))) (lt (int64 $port) 1) (gt (int64 $port) 65535) }}
{{- fail (printf "%s %s must be a port number (1-65535), got %v" $p $key $port) }}
{{- end }}
{{- end }}
{{- if eq (int64 $v.health.port) (int64 $v.metrics.port) }}
{{- fail (printf "%s health.port and metrics.port must differ (both %v)" $p $v.health.port) }}
{{- end }}

{{- /* Resources: an operator without requests gets evicted first, without a memory limit it can starve the node. */}}
{{- $r := $v.resources | default dict }}
{{- $req := $r.requests | default dict }}
{{- $lim := $r.limits | default dict }}
{{- range $key := list "cpu" "memory" }}
{{- if not (index $req $key) }}
{{- fail (printf "%s resources.requests.%s must be set (e.g. resources.requests.%s=%s)" $p $key $key (ternary "100m" "256Mi" (eq $key "cpu"))) }}
{{- end }}
{{- end }}
{{- if not $lim.memory }}
{{- fail (printf "%s resources.limits.memory must be set (e.g. 512Mi)" $p) }}
{{- end }}
{{- end }}
