{{- define "leadscore.labels" -}}
app.kubernetes.io/name: leadscore
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "leadscore.selector" -}}
app.kubernetes.io/name: leadscore
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end -}}

{{- define "leadscore.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 10001
capabilities:
  drop: ["ALL"]
{{- end -}}

{{- define "leadscore.secretEnv" -}}
{{- $s := .Values.secrets -}}
{{- range $var, $ref := dict "LEADSCORE__KAFKA__SASL_PASSWORD" $s.kafkaSaslPassword "LEADSCORE__REGISTRY__PASSWORD" $s.registryPassword "LEADSCORE__POSTGRES__URL" $s.postgresUrl "LEADSCORE__ALERTING__SLACK_WEBHOOK_URL" $s.alertingSlackWebhook "LEADSCORE__ALERTING__PAGERDUTY_ROUTING_KEY" $s.alertingPagerdutyKey "LEADSCORE__ALERTING__SMTP_PASSWORD" $s.alertingSmtpPassword "MLFLOW_TRACKING_USERNAME" $s.mlflowUsername "MLFLOW_TRACKING_PASSWORD" $s.mlflowPassword "MLFLOW_TRACKING_TOKEN" $s.mlflowToken }}
{{- if and $ref $ref.name (not (and (eq $var "LEADSCORE__KAFKA__SASL_PASSWORD") $.Values.strimzi.users.enabled)) }}
- name: {{ $var }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- end }}
{{- end }}
{{- end -}}
