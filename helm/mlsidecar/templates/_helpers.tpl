{{/*
Names, labels and small facts shared by every template. In include mode these run with this
chart's context (`.Subcharts.mlsidecar` in the parent chart), so names match the ConfigMap.
*/}}

{{- define "mlsidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mlsidecar.fullname" -}}
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

{{- define "mlsidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mlsidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mlsidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mlsidecar.labels" -}}
helm.sh/chart: {{ include "mlsidecar.chart" . }}
{{ include "mlsidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "mlsidecar.serviceAccountName" -}}
{{- if .Values.workload.serviceAccount.create }}
{{- default (include "mlsidecar.fullname" .) .Values.workload.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.workload.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mlsidecar.configMapName" -}}
{{- printf "%s-config" (include "mlsidecar.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mlsidecar.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The model container's image: the demo model runs from the agent's image. */}}
{{- define "mlsidecar.modelImage" -}}
{{- if .Values.demoModel.enabled }}
{{- include "mlsidecar.image" . }}
{{- else }}
{{- if not .Values.model.image.repository }}
{{- fail "model.image.repository is required in workload mode (or set demoModel.enabled=true, or workload.enabled=false for include mode)" }}
{{- end }}
{{- printf "%s:%s" .Values.model.image.repository (default "latest" .Values.model.image.tag) }}
{{- end }}
{{- end }}

{{- define "mlsidecar.serviceName" -}}
{{- default (include "mlsidecar.fullname" .) .Values.agent.telemetry.serviceName }}
{{- end }}

{{- define "mlsidecar.serviceVersion" -}}
{{- if .Values.agent.telemetry.serviceVersion }}
{{- .Values.agent.telemetry.serviceVersion }}
{{- else if .Values.demoModel.enabled }}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- else }}
{{- default "unknown" .Values.model.image.tag }}
{{- end }}
{{- end }}

{{/* How the agent finds the model's process (resources.model): the demo model by its command line. */}}
{{- define "mlsidecar.modelSelector" -}}
{{- $m := .Values.model }}
{{- if or $m.processName $m.cmdline }}
{{- with $m.processName }}
process_name: {{ . | quote }}
{{- end }}
{{- with $m.cmdline }}
cmdline: {{ . | quote }}
{{- end }}
{{- else if .Values.demoModel.enabled }}
cmdline: "mlsidecar demo-model"
{{- else }}
{}
{{- end }}
{{- end }}

{{/* "true" when the pod shares one PID namespace (see values: shareProcessNamespace). */}}
{{- define "mlsidecar.shareProcessNamespace" -}}
{{- if kindIs "bool" .Values.shareProcessNamespace }}
{{- .Values.shareProcessNamespace }}
{{- else }}
{{- not (empty (include "mlsidecar.modelSelector" . | fromYaml)) }}
{{- end }}
{{- end }}

{{/* Addresses the agent listens on; the API leaves loopback only when exposed (and protected). */}}
{{- define "mlsidecar.apiHost" -}}
{{- if .Values.agent.api.expose }}0.0.0.0{{ else }}127.0.0.1{{ end }}
{{- end }}

{{- define "mlsidecar.apiScheme" -}}
{{- if .Values.agent.api.tls.existingSecret }}HTTPS{{ else }}HTTP{{ end }}
{{- end }}

{{/* Upstream targets whose URL comes from a Secret, as env names: MLSIDECAR_UPSTREAM__TARGETS__<NAME>__URL. */}}
{{- define "mlsidecar.targetEnvName" -}}
{{- printf "MLSIDECAR_UPSTREAM__TARGETS__%s__URL" (. | upper | replace "-" "_") }}
{{- end }}

{{/* Refuse values the agent would refuse at start, naming the value to fix. */}}
{{- define "mlsidecar.validate" -}}
{{- $api := .Values.agent.api }}
{{- if and $api.expose (not $api.token.existingSecret) (not $api.tls.existingSecret) (not $api.insecure) }}
{{- fail "agent.api.expose=true needs agent.api.token.existingSecret or agent.api.tls.existingSecret (or agent.api.insecure=true): the admin API serves ingest and state-changing endpoints" }}
{{- end }}
{{- if and (eq .Values.agent.store.backend "redis") (not .Values.agent.store.redis.existingSecret) }}
{{- fail "agent.store.backend=redis needs agent.store.redis.existingSecret (a Secret holding the Redis URL)" }}
{{- end }}
{{- if and (not $api.prometheus) (not .Values.agent.telemetry.otlpEndpoint) }}
{{- fail "agent.api.prometheus=false needs agent.telemetry.otlpEndpoint: with no metrics path the agent never becomes ready" }}
{{- end }}
{{- if and (or .Values.serviceMonitor.enabled .Values.podMonitor.enabled) (not $api.expose) }}
{{- fail "serviceMonitor/podMonitor need agent.api.expose=true: Prometheus cannot scrape 127.0.0.1" }}
{{- end }}
{{- range $name, $target := .Values.agent.upstream.targets }}
{{- if and (not $target.url) (not $target.existingSecret) }}
{{- fail (printf "agent.upstream.targets.%s needs url or existingSecret" $name) }}
{{- end }}
{{- if and $target.existingSecret (not (regexMatch "^[a-z0-9_]+$" $name)) }}
{{- fail (printf "agent.upstream.targets.%s: a target whose URL comes from a Secret needs a lower-case name of [a-z0-9_] (it becomes an env var name)" $name) }}
{{- end }}
{{- end }}
{{- end }}
