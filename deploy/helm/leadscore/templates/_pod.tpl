{{- /*
The pod spec of a service: {root, name, svc, job}. As a Job (`job`), the
container serves one request and exits (`--once`), and has no probes.
*/ -}}
{{- define "leadscore.podSpec" -}}
terminationGracePeriodSeconds: {{ add $.svc.shutdownGraceSeconds $.root.Values.terminationGraceMarginSeconds }}
# No service talks to the Kubernetes API: no token in the pod.
automountServiceAccountToken: false
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
containers:
  - name: {{ $.name | kebabcase }}
    {{- if $.root.Values.image.digest }}
    image: "{{ $.root.Values.image.repository }}@{{ $.root.Values.image.digest }}"
    {{- else }}
    image: "{{ $.root.Values.image.repository }}:{{ $.root.Values.image.tag }}"
    {{- end }}
    imagePullPolicy: {{ $.root.Values.image.pullPolicy }}
    args:
      {{- toYaml $.svc.args | nindent 6 }}
      - --log-format=json
      {{- if $.job }}
      - --once
      - --idle-exit-secs={{ $.svc.job.idleExitSeconds }}
      {{- end }}
    env:
      - name: LEADSCORE_CONFIG
        value: /etc/leadscore/leadscore.toml
      {{- if eq $.name "scorer" }}
      # Unique per replica: the transactional id is <prefix>-<instance_id>.
      - name: LEADSCORE__SCORER__INSTANCE_ID
        valueFrom:
          fieldRef:
            fieldPath: metadata.name
      - name: LEADSCORE__SCORER__HTTP_LISTEN
        value: "0.0.0.0:{{ $.svc.httpPort }}"
      {{- else if eq $.name "drift" }}
      - name: LEADSCORE__DRIFT__HTTP_LISTEN
        value: "0.0.0.0:{{ $.svc.httpPort }}"
      {{- else if eq $.name "retrain" }}
      - name: LEADSCORE__RETRAIN__HTTP_LISTEN
        value: "0.0.0.0:{{ $.svc.httpPort }}"
      {{- else if eq $.name "trainingWorker" }}
      - name: LEADSCORE__TRAINING__HTTP_LISTEN
        value: "0.0.0.0:{{ $.svc.httpPort }}"
      {{- else if eq $.name "controller" }}
      - name: LEADSCORE__LIFECYCLE__HTTP_LISTEN
        value: "0.0.0.0:{{ $.svc.httpPort }}"
      {{- else if eq $.name "dashboard" }}
      - name: LEADSCORE__DASHBOARD__HTTP_LISTEN
        value: "0.0.0.0:{{ $.svc.httpPort }}"
      {{- if (dig "lookupTokens" "name" "" $.root.Values.secrets) }}
      - name: LEADSCORE__LOOKUP__AUTH_TOKENS_FILE
        value: /etc/leadscore/tokens/{{ $.root.Values.secrets.lookupTokens.key }}
      {{- end }}
      {{- else if eq $.name "webhook" }}
      - name: LEADSCORE__WEBHOOK__HTTP_LISTEN
        value: "0.0.0.0:{{ $.svc.httpPort }}"
      {{- range $.root.Values.secrets.webhookSecrets }}
      - name: {{ .env }}
        valueFrom:
          secretKeyRef:
            name: {{ .name }}
            key: {{ .key }}
      {{- end }}
      {{- else if eq $.name "lookup" }}
      - name: LEADSCORE__LOOKUP__REST_LISTEN
        value: "0.0.0.0:{{ $.svc.httpPort }}"
      - name: LEADSCORE__LOOKUP__GRPC_LISTEN
        value: "0.0.0.0:{{ $.svc.grpcPort }}"
      {{- with (dig "lookupTls" "name" "" $.root.Values.secrets) }}
      # TLS on gRPC and REST from a kubernetes.io/tls Secret.
      - name: LEADSCORE__LOOKUP__TLS_CERT
        value: /etc/leadscore/tls/tls.crt
      - name: LEADSCORE__LOOKUP__TLS_KEY
        value: /etc/leadscore/tls/tls.key
      {{- if (dig "lookupTls" "clientCa" false $.root.Values.secrets) }}
      - name: LEADSCORE__LOOKUP__TLS_CLIENT_CA
        value: /etc/leadscore/tls/ca.crt
      {{- end }}
      {{- end }}
      {{- if (dig "lookupTokens" "name" "" $.root.Values.secrets) }}
      - name: LEADSCORE__LOOKUP__AUTH_TOKENS_FILE
        value: /etc/leadscore/tokens/{{ $.root.Values.secrets.lookupTokens.key }}
      {{- end }}
      {{- end }}
      {{- include "leadscore.secretEnv" $.root | nindent 6 }}
      {{- if $.root.Values.strimzi.users.enabled }}
      # Signs in as its own KafkaUser, with the password Strimzi keeps in that user's Secret.
      - name: LEADSCORE__KAFKA__SASL_USERNAME
        value: {{ $.root.Release.Name }}-{{ $.name | kebabcase }}
      - name: LEADSCORE__KAFKA__SASL_PASSWORD
        valueFrom:
          secretKeyRef:
            name: {{ $.root.Release.Name }}-{{ $.name | kebabcase }}
            key: password
      {{- end }}
    ports:
      - name: http
        containerPort: {{ $.svc.httpPort }}
      {{- if $.svc.grpcPort }}
      - name: grpc
        containerPort: {{ $.svc.grpcPort }}
      {{- end }}
    {{- if not $.job }}
    livenessProbe:
      httpGet:
        path: /healthz
        port: http
        {{- include "leadscore.probeScheme" $ | nindent 8 }}
      periodSeconds: 10
      failureThreshold: 6
    readinessProbe:
      httpGet:
        path: /readyz
        port: http
        {{- include "leadscore.probeScheme" $ | nindent 8 }}
      periodSeconds: 5
    {{- end }}
    resources:
      {{- toYaml $.svc.resources | nindent 6 }}
    securityContext:
      {{- include "leadscore.securityContext" $.root | nindent 6 }}
    volumeMounts:
      - name: config
        mountPath: /etc/leadscore
        readOnly: true
      - name: tmp
        mountPath: /tmp
      {{- if and (or (eq $.name "lookup") (eq $.name "dashboard")) (dig "lookupTokens" "name" "" $.root.Values.secrets) }}
      - name: tokens
        mountPath: /etc/leadscore/tokens
        readOnly: true
      {{- end }}
      {{- if and (eq $.name "lookup") (dig "lookupTls" "name" "" $.root.Values.secrets) }}
      - name: tls
        mountPath: /etc/leadscore/tls
        readOnly: true
      {{- end }}
volumes:
  - name: config
    configMap:
      name: {{ $.root.Release.Name }}-config
  - name: tmp
    emptyDir: {}
  {{- if and (or (eq $.name "lookup") (eq $.name "dashboard")) (dig "lookupTokens" "name" "" $.root.Values.secrets) }}
  - name: tokens
    secret:
      secretName: {{ (dig "lookupTokens" "name" "" $.root.Values.secrets) }}
  {{- end }}
  {{- if and (eq $.name "lookup") (dig "lookupTls" "name" "" $.root.Values.secrets) }}
  - name: tls
    secret:
      secretName: {{ (dig "lookupTls" "name" "" $.root.Values.secrets) }}
  {{- end }}
{{- if $.job }}
restartPolicy: Never
{{- end }}
{{- end -}}

{{- /* HTTPS probes for the lookup service when its ports are TLS. */ -}}
{{- define "leadscore.probeScheme" -}}
{{- if and (eq .name "lookup") (dig "lookupTls" "name" "" .root.Values.secrets) -}}
scheme: HTTPS
{{- end -}}
{{- end -}}
