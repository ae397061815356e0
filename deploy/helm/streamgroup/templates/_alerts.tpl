{{/*
Alert rules as a list of Prometheus rule groups. prometheusrule.yaml wraps them in a
PrometheusRule; the tests feed the same list to promtool and to a real Prometheus.
*/}}
{{- define "streamgroup.alertGroups" -}}
{{- $s := include "streamgroup.alertSelector" . }}
{{- /* Every process exports the group-level gauges; only the reclaimer's carry the real values. */}}
{{- $g := printf "%s, component=\"reclaimer\"" $s }}
{{- $r := .Values.prometheusRule.rules }}
{{- $by := "namespace, stream, group" }}
- name: streamgroup
  rules:
  {{- with $r.pendingHigh }}{{ if .enabled }}
    - alert: StreamgroupPendingHigh
      expr: max by ({{ $by }}) (streamgroup_group_pending{ {{- $g -}} }) > {{ .threshold }}
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgrouppendinghigh"
        "{{ $labels.group }} on {{ $labels.stream }} has {{ $value }} pending messages"
        (printf "More than %v messages of group {{ $labels.group }} on stream {{ $labels.stream }} were delivered and not acknowledged for %s: consumers are slow, failing or gone." .threshold .for)) }}
  {{- end }}{{ end }}
  {{- with $r.oldestPendingTooOld }}{{ if .enabled }}
    - alert: StreamgroupOldestPendingTooOld
      expr: max by ({{ $by }}) (streamgroup_group_oldest_pending_age_seconds{ {{- $g -}} }) > {{ .thresholdSeconds }}
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgroupoldestpendingtooold"
        "Oldest pending message of {{ $labels.group }} on {{ $labels.stream }} is {{ $value | humanizeDuration }} old"
        (printf "A message of group {{ $labels.group }} on stream {{ $labels.stream }} has been pending longer than %vs: work is stuck and is not being reclaimed." .thresholdSeconds)) }}
  {{- end }}{{ end }}
  {{- with $r.lagGrowing }}{{ if .enabled }}
    - alert: StreamgroupLagGrowing
      expr: >-
        max by ({{ $by }}) (streamgroup_group_lag{ {{- $g -}} }) > {{ .threshold }}
        and max by ({{ $by }}) (delta(streamgroup_group_lag{ {{- $g -}} }[{{ .window }}])) > 0
        and min by ({{ $by }}) (streamgroup_group_lag_known{ {{- $g -}} }) == 1
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgrouplaggrowing"
        "Lag of {{ $labels.group }} on {{ $labels.stream }} is growing ({{ $value }} undelivered)"
        (printf "Group {{ $labels.group }} on stream {{ $labels.stream }} has more than %v undelivered messages and the backlog grew over the last %s: consumers are not keeping up." .threshold .window)) }}
  {{- end }}{{ end }}
  {{- with $r.noActiveConsumer }}{{ if .enabled }}
    - alert: StreamgroupNoActiveConsumer
      expr: >-
        max by ({{ $by }}) (streamgroup_group_consumers_active{ {{- $g -}} }) == 0
        and max by ({{ $by }}) (streamgroup_group_lag{ {{- $g -}} }) > 0
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgroupnoactiveconsumer"
        "No active consumer in {{ $labels.group }} on {{ $labels.stream }} while messages wait"
        "No consumer of group {{ $labels.group }} on stream {{ $labels.stream }} was seen within the last minute, yet undelivered messages are waiting.") }}
  {{- end }}{{ end }}
  {{- with $r.deadLettersIncreasing }}{{ if .enabled }}
    - alert: StreamgroupDeadLettersIncreasing
      expr: sum by ({{ $by }}) (increase(streamgroup_messages_dead_lettered_total{ {{- $s -}} }[{{ .window }}])) > {{ .threshold }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgroupdeadlettersincreasing"
        "{{ $labels.group }} on {{ $labels.stream }} dead-lettered {{ $value | humanize }} messages"
        (printf "Messages of group {{ $labels.group }} on stream {{ $labels.stream }} were moved to the dead-letter stream within the last %s after failing too often." .window)) }}
  {{- end }}{{ end }}
  {{- with $r.lagUnknown }}{{ if .enabled }}
    - alert: StreamgroupLagUnknown
      expr: min by ({{ $by }}) (streamgroup_group_lag_known{ {{- $g -}} }) == 0
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgrouplagunknown"
        "Redis reports the lag of {{ $labels.group }} on {{ $labels.stream }} as unknown"
        "Redis cannot compute the lag of group {{ $labels.group }} on stream {{ $labels.stream }} (entries were deleted or trimmed inside the group's range), so lag-based alerts and autoscaling are blind.") }}
  {{- end }}{{ end }}
  {{- with $r.reclaimerDown }}{{ if .enabled }}
    - alert: StreamgroupReclaimerDown
      expr: absent(up{ {{- $g -}} } == 1)
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgroupreclaimerdown"
        "No streamgroup reclaimer is up"
        "No reclaimer has been scraped successfully: stuck messages are not reclaimed, poison messages are not dead-lettered and the group metrics behind the other alerts are missing.") }}
  {{- end }}{{ end }}
{{- end }}

{{/* labels and annotations of one alert: (list $ ruleValues anchor summary description) */}}
{{- define "streamgroup.alertMeta" -}}
{{- $root := index . 0 }}
{{- $rule := index . 1 }}
      labels:
        severity: {{ $rule.severity }}
        {{- with $root.Values.prometheusRule.additionalLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        summary: {{ index . 3 | quote }}
        description: {{ index . 4 | quote }}
        runbook_url: {{ printf "%s#%s" $root.Values.prometheusRule.runbookBaseUrl (index . 2) | quote }}
{{- end }}
