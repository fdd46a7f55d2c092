{{/*
The demo in one pod (demoModel.enabled): every part on the pod's loopback, as in
docker-compose.yml, where the parts share the agent's network namespace.
*/}}

{{- define "mlsidecar.demo.featureStoreURL" -}}
{{- printf "http://127.0.0.1:%d" (int .Values.demoModel.featureStorePort) }}
{{- end }}

{{/* `mlsidecar demo-model` arguments: its loopback address, the sidecar, the feature store via the proxy. */}}
{{- define "mlsidecar.demo.modelArgs" -}}
{{- $a := .Values.agent }}
{{- $args := list "--listen" (printf "127.0.0.1:%d" (int .Values.model.port)) "--sidecar" (printf "127.0.0.1:%d" (int $a.ingest.port)) }}
{{- if .Values.demoModel.featureStore }}
{{- $args = concat $args (list "--feature-store-url" (printf "http://127.0.0.1:%d/upstream/features" (int $a.upstream.port))) }}
{{- end }}
{{- toYaml (concat $args .Values.demoModel.args) }}
{{- end }}

{{/* The feature store and traffic containers (list items). */}}
{{- define "mlsidecar.demo.containers" -}}
{{- $d := .Values.demoModel }}
{{- $a := .Values.agent }}
{{- if and $d.enabled $d.featureStore }}
- name: demo-feature-store
  image: {{ include "mlsidecar.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["mlsidecar", "demo-feature-store"]
  args: ["--listen", {{ printf "127.0.0.1:%d" (int $d.featureStorePort) | quote }}]
  resources:
    {{- toYaml $d.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.model.securityContext | nindent 4 }}
  volumeMounts:
    - name: model-tmp
      mountPath: /tmp
{{- end }}
{{- if and $d.enabled $d.traffic }}
- name: demo-traffic
  image: {{ include "mlsidecar.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["mlsidecar", "demo-traffic"]
  args:
    {{- $args := list "--target" (printf "http://127.0.0.1:%d" (int .Values.model.port)) "--sidecar" (printf "127.0.0.1:%d" (int $a.ingest.port)) }}
    {{- if $d.featureStore }}
    {{- $args = concat $args (list "--feature-store" (include "mlsidecar.demo.featureStoreURL" .)) }}
    {{- end }}
    {{- toYaml (concat $args $d.trafficArgs) | nindent 4 }}
  resources:
    {{- toYaml $d.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.model.securityContext | nindent 4 }}
  volumeMounts:
    - name: model-tmp
      mountPath: /tmp
{{- end }}
{{- end }}
