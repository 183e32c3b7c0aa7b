{{/*
Names, labels and the small rules shared by the templates. Invariants: every object carries
fluentforward.labels; pods are selected by fluentforward.selectorLabels only (they never change across
upgrades); secrets are referenced as files under /etc/fluentforward/secrets.
*/}}

{{- define "fluentforward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name; 52 characters at most so that "-headless" and StatefulSet pod suffixes still fit. */}}
{{- define "fluentforward.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "fluentforward.headlessName" -}}
{{- printf "%s-headless" (include "fluentforward.fullname" .) }}
{{- end }}

{{- define "fluentforward.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fluentforward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fluentforward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fluentforward.labels" -}}
helm.sh/chart: {{ include "fluentforward.chart" . }}
{{ include "fluentforward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "fluentforward.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fluentforward.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "fluentforward.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where secrets and the config file are mounted in the container. */}}
{{- define "fluentforward.secretDir" -}}/etc/fluentforward/secrets{{- end }}
{{- define "fluentforward.configFile" -}}/etc/fluentforward/config/fluentforward.toml{{- end }}
{{- define "fluentforward.spoolMount" -}}/var/lib/fluentforward{{- end }}

{{/*
One FLUENTFORWARD_* environment variable, rendered only when the value is set: (list NAME VALUE).
`false` and 0 are values; null and "" mean "leave the server's default".
*/}}
{{- define "fluentforward.env" -}}
{{- $name := index . 0 }}
{{- $value := index . 1 }}
{{- if not (or (kindIs "invalid" $value) (eq (toString $value) "")) }}
- name: FLUENTFORWARD_{{ $name }}
  value: {{ toString $value | quote }}
{{- end }}
{{- end }}

{{/*
Secret-backed settings share one shape: {value, existingSecret, existingSecretKey}. "enabled" is true
when either is set; the item is read from the existing Secret or from the chart's own Secret.
*/}}
{{- define "fluentforward.secretRef.enabled" -}}
{{- if or .value .existingSecret }}true{{ end }}
{{- end }}

{{- define "fluentforward.usersEnabled" -}}
{{- if or .Values.security.users.list .Values.security.users.existingSecret }}true{{ end }}
{{- end }}

{{- define "fluentforward.serverTLSSecret" -}}
{{- default (include "fluentforward.fullname" .) .Values.security.tls.existingSecret }}
{{- end }}

{{- define "fluentforward.lokiTLSEnabled" -}}
{{- if or .Values.loki.tls.ca .Values.loki.tls.cert .Values.loki.tls.existingSecret }}true{{ end }}
{{- end }}

{{- define "fluentforward.lokiClientCert" -}}
{{- if or .Values.loki.tls.cert (and .Values.loki.tls.existingSecret .Values.loki.tls.clientCert) }}true{{ end }}
{{- end }}

{{/* The chart's own Secret holds every inline secret value; it is rendered only when it has data. */}}
{{- define "fluentforward.secretData" -}}
{{- $v := .Values }}
{{- if and $v.security.sharedKey.value (not $v.security.sharedKey.existingSecret) }}
shared-key: {{ $v.security.sharedKey.value | b64enc | quote }}
{{- end }}
{{- if and $v.security.users.list (not $v.security.users.existingSecret) }}
{{- $lines := list }}
{{- range $v.security.users.list }}
{{- $lines = append $lines (printf "%s:%s" .name .password) }}
{{- end }}
users: {{ printf "%s\n" (join "\n" $lines) | b64enc | quote }}
{{- end }}
{{- if and $v.loki.password.value (not $v.loki.password.existingSecret) }}
loki-password: {{ $v.loki.password.value | b64enc | quote }}
{{- end }}
{{- if and $v.loki.bearerToken.value (not $v.loki.bearerToken.existingSecret) }}
loki-bearer-token: {{ $v.loki.bearerToken.value | b64enc | quote }}
{{- end }}
{{- if and $v.security.tls.enabled (not $v.security.tls.existingSecret) }}
tls.crt: {{ required "security.tls.cert (or security.tls.existingSecret) is required when TLS is enabled" $v.security.tls.cert | b64enc | quote }}
tls.key: {{ required "security.tls.key (or security.tls.existingSecret) is required when TLS is enabled" $v.security.tls.key | b64enc | quote }}
{{- if $v.security.tls.clientAuth }}
ca.crt: {{ required "security.tls.clientCA is required when security.tls.clientAuth is true" $v.security.tls.clientCA | b64enc | quote }}
{{- end }}
{{- end }}
{{- if not $v.loki.tls.existingSecret }}
{{- with $v.loki.tls.ca }}
loki-ca.crt: {{ . | b64enc | quote }}
{{- end }}
{{- if $v.loki.tls.cert }}
loki-tls.crt: {{ $v.loki.tls.cert | b64enc | quote }}
loki-tls.key: {{ required "loki.tls.key is required with loki.tls.cert" $v.loki.tls.key | b64enc | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* Projected-volume sources for every mounted secret file (empty when no secret is configured). */}}
{{- define "fluentforward.secretSources" -}}
{{- $v := .Values }}
{{- $own := include "fluentforward.fullname" . }}
{{- range $item := list (list $v.security.sharedKey "shared-key") (list $v.loki.password "loki-password") (list $v.loki.bearerToken "loki-bearer-token") }}
{{- $ref := index $item 0 }}
{{- if include "fluentforward.secretRef.enabled" $ref }}
- secret:
    name: {{ default $own $ref.existingSecret }}
    items:
      - key: {{ ternary $ref.existingSecretKey (index $item 1) (not (empty $ref.existingSecret)) }}
        path: {{ index $item 1 }}
{{- end }}
{{- end }}
{{- if include "fluentforward.usersEnabled" . }}
- secret:
    name: {{ default $own $v.security.users.existingSecret }}
    items:
      - key: {{ ternary $v.security.users.existingSecretKey "users" (not (empty $v.security.users.existingSecret)) }}
        path: users
{{- end }}
{{- if $v.security.tls.enabled }}
- secret:
    name: {{ include "fluentforward.serverTLSSecret" . }}
    items:
      - key: tls.crt
        path: tls/tls.crt
      - key: tls.key
        path: tls/tls.key
      {{- if $v.security.tls.clientAuth }}
      - key: ca.crt
        path: tls/ca.crt
      {{- end }}
{{- end }}
{{- if include "fluentforward.lokiTLSEnabled" . }}
{{- $external := not (empty $v.loki.tls.existingSecret) }}
- secret:
    name: {{ default $own $v.loki.tls.existingSecret }}
    items:
      {{- if or $external $v.loki.tls.ca }}
      - key: {{ ternary "ca.crt" "loki-ca.crt" $external }}
        path: loki-tls/ca.crt
      {{- end }}
      {{- if include "fluentforward.lokiClientCert" . }}
      - key: {{ ternary "tls.crt" "loki-tls.crt" $external }}
        path: loki-tls/tls.crt
      - key: {{ ternary "tls.key" "loki-tls.key" $external }}
        path: loki-tls/tls.key
      {{- end }}
{{- end }}
{{- end }}

{{/*
The --config TOML: options that take a list. Keys are option names with "_" (label, structured_metadata,
loki_header, allow); config.extra adds anything else.
*/}}
{{- define "fluentforward.configToml" -}}
{{- $v := .Values }}
{{- $cfg := deepCopy $v.config.extra }}
{{- $labels := list }}
{{- range $name, $template := $v.shaping.labels }}
{{- $labels = append $labels (printf "%s=%s" $name $template) }}
{{- end }}
{{- if $labels }}{{ $_ := set $cfg "label" $labels }}{{ end }}
{{- $metadata := list }}
{{- range $name, $template := $v.shaping.structuredMetadata }}
{{- $metadata = append $metadata (printf "%s=%s" $name $template) }}
{{- end }}
{{- if $metadata }}{{ $_ := set $cfg "structured_metadata" $metadata }}{{ end }}
{{- with $v.loki.headers }}{{ $_ := set $cfg "loki_header" . }}{{ end }}
{{- with $v.security.allow }}{{ $_ := set $cfg "allow" . }}{{ end }}
# fluentforward serve --config (rendered by the Helm chart; environment variables take precedence).
{{ toToml $cfg | trim }}
{{- end }}

{{/* Rejects combinations that would render but not run. */}}
{{- define "fluentforward.validate" -}}
{{- $grace := int .Values.server.shutdownGraceSeconds }}
{{- with .Values.terminationGracePeriodSeconds }}
{{- if le (int .) $grace }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be larger than server.shutdownGraceSeconds (%d)" (int .) $grace) }}
{{- end }}
{{- end }}
{{- if and (include "fluentforward.usersEnabled" .) (not (include "fluentforward.secretRef.enabled" .Values.security.sharedKey)) }}
{{- fail "security.users needs security.sharedKey: Forward user authentication is part of the shared-key handshake" }}
{{- end }}
{{- if and (include "fluentforward.secretRef.enabled" .Values.loki.password) (not .Values.loki.username) }}
{{- fail "loki.password needs loki.username" }}
{{- end }}
{{- end }}

{{/* The FLUENTFORWARD_* variables of the server container, one per option that has a value. */}}
{{- define "fluentforward.envVars" -}}
{{- $v := .Values }}
{{- $secretDir := include "fluentforward.secretDir" . }}
{{- $sharedKey := include "fluentforward.secretRef.enabled" $v.security.sharedKey }}
{{- include "fluentforward.env" (list "LISTEN" (printf "%s:%d" $v.server.listenHost (int $v.server.port))) }}
{{- include "fluentforward.env" (list "HTTP_LISTEN" (printf "%s:%d" $v.server.listenHost (int $v.server.httpPort))) }}
{{- include "fluentforward.env" (list "SPOOL_DIR" (printf "%s/spool" (include "fluentforward.spoolMount" .))) }}
{{- include "fluentforward.env" (list "CONFIG" (include "fluentforward.configFile" .)) }}
{{- include "fluentforward.env" (list "SPOOL_MAX_BYTES" $v.spool.maxBytes) }}
{{- include "fluentforward.env" (list "SPOOL_SEGMENT_BYTES" $v.spool.segmentBytes) }}
{{- include "fluentforward.env" (list "SPOOL_FSYNC_INTERVAL" $v.spool.fsyncInterval) }}
{{- include "fluentforward.env" (list "DEDUP_CAPACITY" (int64 $v.spool.dedupCapacity)) }}
{{- include "fluentforward.env" (list "SPOOL_RETENTION" $v.spool.retention) }}
{{- include "fluentforward.env" (list "SPOOL_RETENTION_BYTES" $v.spool.retentionBytes) }}
{{- include "fluentforward.env" (list "MAX_FRAME_BYTES" $v.limits.maxFrameBytes) }}
{{- include "fluentforward.env" (list "MAX_DECOMPRESSED_BYTES" $v.limits.maxDecompressedBytes) }}
{{- include "fluentforward.env" (list "MAX_ENTRIES_PER_FRAME" (int64 $v.limits.maxEntriesPerFrame)) }}
{{- include "fluentforward.env" (list "MAX_TAG_BYTES" (int64 $v.limits.maxTagBytes)) }}
{{- include "fluentforward.env" (list "IDLE_TIMEOUT" $v.server.idleTimeout) }}
{{- include "fluentforward.env" (list "MAX_CONNECTIONS" (int64 $v.server.maxConnections)) }}
{{- include "fluentforward.env" (list "MAX_RECEIVING" (int64 $v.server.maxReceiving)) }}
{{- include "fluentforward.env" (list "TAG_PREFIX" $v.server.tagPrefix) }}
{{- include "fluentforward.env" (list "SOURCE_ADDRESS_KEY" $v.server.sourceAddressKey) }}
{{- include "fluentforward.env" (list "UDP_HEARTBEAT" $v.server.udpHeartbeat) }}
{{- include "fluentforward.env" (list "SHUTDOWN_GRACE" (printf "%ds" (int $v.server.shutdownGraceSeconds))) }}
{{- include "fluentforward.env" (list "HANDSHAKE_TIMEOUT" $v.server.handshakeTimeout) }}
{{- include "fluentforward.env" (list "FRAME_TIMEOUT" $v.server.frameTimeout) }}
{{- include "fluentforward.env" (list "WORKERS" (int64 $v.server.workers)) }}
{{- include "fluentforward.env" (list "LOG_LEVEL" $v.server.logLevel) }}
{{- include "fluentforward.env" (list "LOG_FORMAT" $v.server.logFormat) }}
{{- if $v.loki.url }}
{{- include "fluentforward.env" (list "LOKI_URL" $v.loki.url) }}
{{- include "fluentforward.env" (list "LOKI_FORMAT" $v.loki.format) }}
{{- include "fluentforward.env" (list "LOKI_TENANT" $v.loki.tenant) }}
{{- include "fluentforward.env" (list "LOKI_TENANT_KEY" $v.loki.tenantKey) }}
{{- include "fluentforward.env" (list "LOKI_USERNAME" $v.loki.username) }}
{{- if include "fluentforward.secretRef.enabled" $v.loki.password }}
{{- include "fluentforward.env" (list "LOKI_PASSWORD_FILE" (printf "%s/loki-password" $secretDir)) }}
{{- end }}
{{- if include "fluentforward.secretRef.enabled" $v.loki.bearerToken }}
{{- include "fluentforward.env" (list "LOKI_BEARER_TOKEN_FILE" (printf "%s/loki-bearer-token" $secretDir)) }}
{{- end }}
{{- if or $v.loki.tls.ca $v.loki.tls.existingSecret }}
{{- include "fluentforward.env" (list "LOKI_CA_FILE" (printf "%s/loki-tls/ca.crt" $secretDir)) }}
{{- end }}
{{- if include "fluentforward.lokiClientCert" . }}
{{- include "fluentforward.env" (list "LOKI_CERT_FILE" (printf "%s/loki-tls/tls.crt" $secretDir)) }}
{{- include "fluentforward.env" (list "LOKI_KEY_FILE" (printf "%s/loki-tls/tls.key" $secretDir)) }}
{{- end }}
{{- include "fluentforward.env" (list "LOKI_TIMEOUT" $v.loki.timeout) }}
{{- include "fluentforward.env" (list "LOKI_BATCH_BYTES" $v.loki.batchBytes) }}
{{- include "fluentforward.env" (list "LOKI_BATCH_WAIT" $v.loki.batchWait) }}
{{- include "fluentforward.env" (list "LOKI_CONCURRENCY" (int64 $v.loki.concurrency)) }}
{{- include "fluentforward.env" (list "DELIVERY_PROCESS" $v.loki.deliveryProcess) }}
{{- $lanes := $v.loki.deliveryProcesses }}
{{- include "fluentforward.env" (list "DELIVERY_PROCESSES" (ternary $lanes (int64 $lanes) (kindIs "string" $lanes))) }}
{{- end }}
{{- include "fluentforward.env" (list "CLUSTER" $v.shaping.cluster) }}
{{- include "fluentforward.env" (list "LINE_FORMAT" $v.shaping.lineFormat) }}
{{- include "fluentforward.env" (list "TRACE_FIELDS" (join "," $v.shaping.traceFields)) }}
{{- include "fluentforward.env" (list "SPAN_FIELDS" (join "," $v.shaping.spanFields)) }}
{{- if not $v.shaping.scanText }}
{{- include "fluentforward.env" (list "SCAN_TEXT" false) }}
{{- end }}
{{- if $sharedKey }}
{{- include "fluentforward.env" (list "SHARED_KEY_FILE" (printf "%s/shared-key" $secretDir)) }}
- name: FLUENTFORWARD_SELF_HOSTNAME
  {{- if $v.security.selfHostname }}
  value: {{ $v.security.selfHostname | quote }}
  {{- else }}
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
  {{- end }}
{{- end }}
{{- if include "fluentforward.usersEnabled" . }}
{{- include "fluentforward.env" (list "USERS_FILE" (printf "%s/users" $secretDir)) }}
{{- end }}
{{- if $v.security.tls.enabled }}
{{- include "fluentforward.env" (list "TLS_CERT" (printf "%s/tls/tls.crt" $secretDir)) }}
{{- include "fluentforward.env" (list "TLS_KEY" (printf "%s/tls/tls.key" $secretDir)) }}
{{- if $v.security.tls.clientAuth }}
{{- include "fluentforward.env" (list "TLS_CLIENT_CA" (printf "%s/tls/ca.crt" $secretDir)) }}
{{- end }}
{{- include "fluentforward.env" (list "TLS_MIN_VERSION" $v.security.tls.minVersion) }}
{{- end }}
{{- end }}
