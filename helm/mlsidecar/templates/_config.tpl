{{/*
The agent's YAML config (agent/config.py keys), rendered into the ConfigMap. Secrets are NOT
here: they reach the agent as MLSIDECAR_* env from Secrets (see "mlsidecar.secretEnv").
*/}}
{{- define "mlsidecar.config" -}}
{{- $a := .Values.agent }}
{{- $api := dict "listen" (printf "%s:%d" (include "mlsidecar.apiHost" .) (int $a.api.port)) "prometheus" $a.api.prometheus }}
{{- if and $a.api.expose $a.api.insecure }}
{{- $_ := set $api "insecure" true }}
{{- end }}
{{- if $a.api.tls.existingSecret }}
{{- $_ := set $api "tls" (dict "cert" "/etc/mlsidecar-tls/tls.crt" "key" "/etc/mlsidecar-tls/tls.key") }}
{{- end }}
{{- $telemetry := dict "service_name" (include "mlsidecar.serviceName" .) "otlp" (not (empty $a.telemetry.otlpEndpoint)) "protocol" $a.telemetry.protocol }}
{{- $store := dict "data_dir" $a.store.dataDir "backend" $a.store.backend }}
{{- if $a.store.redis.keyPrefix }}
{{- $_ := set $store "redis" (dict "key_prefix" $a.store.redis.keyPrefix) }}
{{- end }}
{{- $model := include "mlsidecar.modelSelector" . | fromYaml }}
{{- $targets := dict }}
{{- range $name, $t := $a.upstream.targets }}
{{- $target := dict "policy" (default "default" $t.policy) }}
{{- if $t.url }}{{ $_ := set $target "url" $t.url }}{{ end }}
{{- $_ := set $targets $name $target }}
{{- end }}
{{- if and .Values.demoModel.enabled .Values.demoModel.featureStore (not (hasKey $targets "features")) }}
{{- $_ := set $targets "features" (dict "url" (include "mlsidecar.demo.featureStoreURL" .) "policy" "default") }}
{{- end }}
{{- $upstream := dict "listen" (printf "127.0.0.1:%d" (int $a.upstream.port)) }}
{{- with $a.upstream.policies }}{{ $_ := set $upstream "policies" (deepCopy .) }}{{ end }}
{{- with $targets }}{{ $_ := set $upstream "targets" . }}{{ end }}
{{- $alerts := dict "default_rules" $a.alerts.defaultRules }}
{{- with $a.alerts.rules }}{{ $_ := set $alerts "rules" (deepCopy .) }}{{ end }}
{{- with $a.alerts.channels }}{{ $_ := set $alerts "channels" (deepCopy .) }}{{ end }}
{{- $config := dict
  "ingest" (dict "listen" (printf "127.0.0.1:%d" (int $a.ingest.port)))
  "api" $api
  "telemetry" $telemetry
  "store" $store
  "resources" (dict "model" $model)
  "upstream" $upstream
  "alerts" $alerts
  "logging" (dict "level" $a.logLevel "format" "json")
}}
{{- toYaml (mergeOverwrite $config (deepCopy $a.config)) }}
{{- end }}

{{/* sha256 of the config and of the values that shape the pod's env: a change rolls the pod. */}}
{{- define "mlsidecar.configChecksum" -}}
{{- list (include "mlsidecar.config" .) (include "mlsidecar.secretEnv" .) | toJson | sha256sum }}
{{- end }}
