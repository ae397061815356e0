{{/* Chart name, shortened to the 63 characters of a DNS label. */}}
{{- define "streamgroup.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name "<release>-<chart>", or the release name alone when it already contains the chart name. */}}
{{- define "streamgroup.fullname" -}}
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

{{/* Name of a component's objects. Call with (dict "root" $ "component" "consumer"). */}}
{{- define "streamgroup.componentName" -}}
{{- printf "%s-%s" (include "streamgroup.fullname" .root | trunc (int (sub 62 (len .component)))) .component | trimSuffix "-" }}
{{- end }}

{{- define "streamgroup.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that never change over the life of a release: used in selectors. */}}
{{- define "streamgroup.selectorLabels" -}}
app.kubernetes.io/name: {{ include "streamgroup.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "streamgroup.labels" -}}
helm.sh/chart: {{ include "streamgroup.chart" . }}
{{ include "streamgroup.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: streamgroup
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Call with (dict "root" $ "component" "consumer"). */}}
{{- define "streamgroup.componentSelectorLabels" -}}
{{ include "streamgroup.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "streamgroup.componentLabels" -}}
{{ include "streamgroup.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "streamgroup.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "streamgroup.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "streamgroup.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "streamgroup.redisName" -}}
{{- include "streamgroup.componentName" (dict "root" . "component" "redis") }}
{{- end }}

{{/* The Redis URL the services use, without a password (that comes from a file). */}}
{{- define "streamgroup.redisUrl" -}}
{{- if .Values.redis.bundled.enabled }}
{{- printf "redis://%s:6379/0" (include "streamgroup.redisName" .) }}
{{- else }}
{{- required "redis.external.url is required when redis.bundled.enabled is false" .Values.redis.external.url }}
{{- end }}
{{- end }}

{{/* A value as a string; whole numbers without the exponent YAML-decoded floats print with (1e+06). */}}
{{- define "streamgroup.string" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* Fails the render on value combinations the schema cannot express. */}}
{{- define "streamgroup.validate" -}}
{{- if and .Values.redis.bundled.enabled .Values.redis.external.url }}
{{- fail "set either redis.bundled.enabled or redis.external.url, not both" }}
{{- end }}
{{- $autoscaling := .Values.consumer.autoscaling }}
{{- if and $autoscaling.hpa.enabled $autoscaling.keda.enabled }}
{{- fail "consumer.autoscaling: enable hpa or keda, not both" }}
{{- end }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int (ceil .Values.config.shutdownGraceSeconds)) }}
{{- fail "terminationGracePeriodSeconds must be larger than config.shutdownGraceSeconds" }}
{{- end }}
{{- if ne (empty .Values.redis.tls.certKey) (empty .Values.redis.tls.keyKey) }}
{{- fail "redis.tls.certKey and redis.tls.keyKey go together" }}
{{- end }}
{{- end }}

{{/* Volumes and mounts shared by every streamgroup pod (also the test pod). */}}
{{- define "streamgroup.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with .Values.redis.auth.existingSecret }}
- name: redis-password
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: {{ $.Values.redis.auth.existingSecretPasswordKey }}
        path: password
{{- end }}
{{- with .Values.redis.tls }}
{{- if .existingSecret }}
- name: redis-tls
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end }}
{{- end }}

{{- define "streamgroup.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.redis.auth.existingSecret }}
- name: redis-password
  mountPath: /var/run/secrets/streamgroup/redis-password
  readOnly: true
{{- end }}
{{- if .Values.redis.tls.existingSecret }}
- name: redis-tls
  mountPath: /var/run/secrets/streamgroup/redis-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* Environment of every streamgroup container: the shared ConfigMap plus per-pod values. */}}
{{- define "streamgroup.env" -}}
- name: STREAMGROUP_CONSUMER_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- if .Values.redis.auth.existingSecret }}
- name: STREAMGROUP_REDIS_PASSWORD_FILE
  value: /var/run/secrets/streamgroup/redis-password/password
{{- end }}
{{- with .Values.redis.tls }}
{{- if .existingSecret }}
- name: STREAMGROUP_REDIS_CA_FILE
  value: /var/run/secrets/streamgroup/redis-tls/{{ .caKey }}
{{- if .certKey }}
- name: STREAMGROUP_REDIS_CERT_FILE
  value: /var/run/secrets/streamgroup/redis-tls/{{ .certKey }}
- name: STREAMGROUP_REDIS_KEY_FILE
  value: /var/run/secrets/streamgroup/redis-tls/{{ .keyKey }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Label matchers that pick this release's series in alert expressions. */}}
{{- define "streamgroup.alertSelector" -}}
{{- default (printf "job=%q" (printf "%s/%s" .Release.Namespace (include "streamgroup.fullname" .))) .Values.prometheusRule.selector }}
{{- end }}
