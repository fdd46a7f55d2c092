{{/* One scrape endpoint of the admin API (ServiceMonitor/PodMonitor): port, scheme, token. */}}
{{- define "mlsidecar.scrapeEndpoint" -}}
{{- $api := .ctx.Values.agent.api }}
- port: admin
  path: /metrics
  interval: {{ .monitor.interval }}
  scrapeTimeout: {{ .monitor.scrapeTimeout }}
  scheme: {{ include "mlsidecar.apiScheme" .ctx | lower }}
  {{- with .monitor.tlsConfig }}
  tlsConfig:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if $api.token.existingSecret }}
  authorization:
    type: Bearer
    credentials:
      name: {{ $api.token.existingSecret }}
      key: {{ $api.token.key }}
  {{- end }}
{{- end }}
