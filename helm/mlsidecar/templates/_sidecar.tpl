{{/*
Named templates that put the sidecar into a pod. The chart's own Deployment uses them, and so
can your chart (include mode): add this chart as a dependency and pass it ITS context,
`.Subcharts.mlsidecar`, so that names, values and the image tag are this chart's:

  spec:
    shareProcessNamespace: {{ include "mlsidecar.shareProcessNamespace" .Subcharts.mlsidecar }}
    initContainers:   # native sidecar (empty in classic mode)
      {{- include "mlsidecar.initContainers" .Subcharts.mlsidecar | nindent 6 }}
    containers:
      - name: model
        env:
          {{- include "mlsidecar.modelEnv" .Subcharts.mlsidecar | nindent 10 }}
      {{- include "mlsidecar.containers" .Subcharts.mlsidecar | nindent 6 }}
    volumes:
      {{- include "mlsidecar.volumes" .Subcharts.mlsidecar | nindent 6 }}

and the pod template's annotations: {{ include "mlsidecar.podAnnotations" .Subcharts.mlsidecar }}.
*/}}

{{/* The sidecar container itself (a list item); "native" adds restartPolicy: Always. */}}
{{- define "mlsidecar.sidecarContainer" -}}
{{- $s := .Values.sidecar }}
{{- $a := .Values.agent -}}
- name: {{ $s.containerName }}
  image: {{ include "mlsidecar.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if eq $s.mode "native" }}
  # A native sidecar: started (and started-up) before the model, stopped after it.
  restartPolicy: Always
  {{- end }}
  command: ["mlsidecar"]
  args: ["run"]
  env:
    {{- include "mlsidecar.sidecarEnv" . | nindent 4 }}
  {{- if $a.api.expose }}
  ports:
    - name: admin
      containerPort: {{ int $a.api.port }}
      protocol: TCP
  {{- end }}
  {{- include "mlsidecar.probes" . | nindent 2 }}
  resources:
    {{- toYaml $s.resources | nindent 4 }}
  securityContext:
    {{- toYaml $s.securityContext | nindent 4 }}
  volumeMounts:
    - name: mlsidecar-config
      mountPath: /etc/mlsidecar
      readOnly: true
    - name: mlsidecar-data
      mountPath: {{ $a.store.dataDir }}
    - name: mlsidecar-tmp
      mountPath: /tmp
    {{- if $a.api.tls.existingSecret }}
    - name: mlsidecar-tls
      mountPath: /etc/mlsidecar-tls
      readOnly: true
    {{- end }}
    {{- with $s.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}

{{/* Native mode: the sidecar as an init container with restartPolicy: Always. Empty in classic mode. */}}
{{- define "mlsidecar.initContainers" -}}
{{- if eq .Values.sidecar.mode "native" }}
{{- include "mlsidecar.sidecarContainer" . }}
{{- end }}
{{- end }}

{{/* Classic mode: the sidecar as a second regular container. Empty in native mode. */}}
{{- define "mlsidecar.containers" -}}
{{- if eq .Values.sidecar.mode "classic" }}
{{- include "mlsidecar.sidecarContainer" . }}
{{- end }}
{{- end }}

{{/*
Probes. The kubelet reaches the pod IP, not 127.0.0.1. By default the API stays on loopback
and the probes exec `mlsidecar health --probe` inside the container (it reads the same config
and GETs /readyz on loopback). With agent.api.expose the API listens on the pod IP behind a
token/TLS, and the kubelet GETs /readyz and /healthz, which need no token.
*/}}
{{- define "mlsidecar.probes" -}}
{{- $p := .Values.sidecar.probes }}
{{- $exec := dict "exec" (dict "command" (list "mlsidecar" "health" "--probe" "--timeout" "3")) }}
{{- $ready := $exec }}
{{- $live := $exec }}
{{- if .Values.agent.api.expose }}
{{- $ready = dict "httpGet" (dict "path" "/readyz" "port" "admin" "scheme" (include "mlsidecar.apiScheme" .)) }}
{{- $live = dict "httpGet" (dict "path" "/healthz" "port" "admin" "scheme" (include "mlsidecar.apiScheme" .)) }}
{{- end -}}
startupProbe:
  {{- toYaml (merge (deepCopy $ready) $p.startup) | nindent 2 }}
readinessProbe:
  {{- toYaml (merge (deepCopy $ready) $p.readiness) | nindent 2 }}
livenessProbe:
  {{- toYaml (merge (deepCopy $live) $p.liveness) | nindent 2 }}
{{- end }}

{{/* Secrets reach the agent as env from existing Secrets, never through the ConfigMap. */}}
{{- define "mlsidecar.secretEnv" -}}
{{- $a := .Values.agent }}
{{- $refs := list }}
{{- if $a.ingest.token.existingSecret }}
{{- $refs = append $refs (list "MLSIDECAR_INGEST__TOKEN" $a.ingest.token.existingSecret $a.ingest.token.key) }}
{{- end }}
{{- if $a.api.token.existingSecret }}
{{- $refs = append $refs (list "MLSIDECAR_API__TOKEN" $a.api.token.existingSecret $a.api.token.key) }}
{{- end }}
{{- if $a.api.adminToken.existingSecret }}
{{- $refs = append $refs (list "MLSIDECAR_API__ADMIN_TOKEN" $a.api.adminToken.existingSecret $a.api.adminToken.key) }}
{{- end }}
{{- if eq $a.store.backend "redis" }}
{{- $refs = append $refs (list "MLSIDECAR_STORE__REDIS__URL" $a.store.redis.existingSecret $a.store.redis.key) }}
{{- end }}
{{- if $a.telemetry.headers.existingSecret }}
{{- $refs = append $refs (list "OTEL_EXPORTER_OTLP_HEADERS" $a.telemetry.headers.existingSecret $a.telemetry.headers.key) }}
{{- end }}
{{- range $name, $t := $a.upstream.targets }}
{{- if $t.existingSecret }}
{{- $refs = append $refs (list (include "mlsidecar.targetEnvName" $name) $t.existingSecret (default "url" $t.key)) }}
{{- end }}
{{- end }}
{{- range $refs }}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ index . 1 | quote }}
      key: {{ index . 2 | quote }}
{{- end }}
{{- end }}

{{/* The sidecar's env: config file, Downward API, OpenTelemetry, the model's limits, secrets. */}}
{{- define "mlsidecar.sidecarEnv" -}}
{{- $a := .Values.agent -}}
- name: MLSIDECAR_CONFIG
  value: /etc/mlsidecar/mlsidecar.yaml
# glibc malloc: 2 arenas instead of up to 8 per core (one per busy thread) keep the peak RSS
# off the 200 MB bound (bench/README.md, "Memory benchmark"); as the image sets it too.
- name: MALLOC_ARENA_MAX
  value: "2"
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NAMESPACE_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: K8S_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: K8S_POD_UID
  valueFrom:
    fieldRef:
      fieldPath: metadata.uid
- name: OTEL_SERVICE_NAME
  value: {{ include "mlsidecar.serviceName" . | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ printf "k8s.pod.name=$(K8S_POD_NAME),k8s.namespace.name=$(K8S_NAMESPACE_NAME),k8s.node.name=$(K8S_NODE_NAME),k8s.pod.uid=$(K8S_POD_UID),k8s.container.name=%s,service.name=%s,service.version=%s" .Values.sidecar.containerName (include "mlsidecar.serviceName" .) (include "mlsidecar.serviceVersion" .) | quote }}
{{- with $a.telemetry.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $a.telemetry.protocol | quote }}
{{- end }}
{{- if .Values.model.containerName }}
# The model container's limits: the sidecar can read only its own cgroup.
- name: MLSIDECAR_RESOURCES__MODEL__MEMORY_LIMIT_BYTES
  valueFrom:
    resourceFieldRef:
      containerName: {{ .Values.model.containerName }}
      resource: limits.memory
      divisor: "1"
- name: MLSIDECAR_RESOURCES__MODEL__CPU_LIMIT_MILLICORES
  valueFrom:
    resourceFieldRef:
      containerName: {{ .Values.model.containerName }}
      resource: limits.cpu
      divisor: 1m
{{- end }}
{{- include "mlsidecar.secretEnv" . }}
{{- with .Values.sidecar.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Env for the model container: where its sidecar listens (all on the pod's loopback). */}}
{{- define "mlsidecar.modelEnv" -}}
{{- $a := .Values.agent -}}
- name: MLSIDECAR_TARGET
  value: {{ printf "127.0.0.1:%d" (int $a.ingest.port) | quote }}
- name: MLSIDECAR_API_URL
  value: {{ printf "%s://127.0.0.1:%d" (include "mlsidecar.apiScheme" . | lower) (int $a.api.port) | quote }}
- name: MLSIDECAR_UPSTREAM_URL
  value: {{ printf "http://127.0.0.1:%d/upstream" (int $a.upstream.port) | quote }}
{{- if $a.ingest.token.existingSecret }}
- name: MLSIDECAR_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $a.ingest.token.existingSecret | quote }}
      key: {{ $a.ingest.token.key | quote }}
{{- end }}
{{- end }}

{{/* The pod's volumes for the sidecar: config, data dir (emptyDir or PVC), /tmp, TLS. */}}
{{- define "mlsidecar.volumes" -}}
{{- $store := .Values.agent.store -}}
- name: mlsidecar-config
  configMap:
    name: {{ include "mlsidecar.configMapName" . }}
- name: mlsidecar-data
  {{- if $store.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-data" (include "mlsidecar.fullname" .)) $store.persistence.existingClaim }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ $store.emptyDir.sizeLimit }}
  {{- end }}
- name: mlsidecar-tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if .Values.agent.api.tls.existingSecret }}
- name: mlsidecar-tls
  secret:
    secretName: {{ .Values.agent.api.tls.existingSecret }}
{{- end }}
{{- end }}

{{/* Pod template annotations: the config checksum rolls the pod when the agent config changes. */}}
{{- define "mlsidecar.podAnnotations" -}}
checksum/mlsidecar-config: {{ include "mlsidecar.configChecksum" . }}
{{- end }}
