{{/*
Alert rules as a list of Prometheus rule groups. prometheusrule.yaml wraps them in a
PrometheusRule; the tests feed the same list to promtool and to a real Prometheus.
*/}}
{{- define "streamgroup.alertGroups" -}}
{{- $s := include "streamgroup.alertSelector" . }}
{{- /* Only the reclaimer exports the group-level gauges (and only while connected to Redis). */}}
{{- $g := printf "%s, component=\"reclaimer\"" $s }}
{{- $r := .Values.prometheusRule.rules }}
{{- $by := "namespace, stream, group" }}
{{- /* With shards, the reclaimer exports each group gauge once per shard (label "shard"). Two
reclaimers (a rollout, replicas: 2) export the same series twice: max over those per shard, then
sum (lag, pending) or max (idle, age) over the shards. Without a shard label the inner max is
the reclaimers' max alone, so the rules work with and without shards. */}}
{{- $perShard := "namespace, stream, group, shard" }}
- name: streamgroup
  rules:
  {{- with $r.redisDown }}{{ if .enabled }}
    - alert: StreamgroupRedisDown
      expr: count by (namespace) (streamgroup_redis_connected{ {{- $s -}} } == 0) > 0
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgroupredisdown"
        "{{ $value }} streamgroup processes in {{ $labels.namespace }} cannot reach Redis"
        (printf "{{ $value }} streamgroup processes have been disconnected from Redis for %s: nothing is produced, consumed or reclaimed, and the group metrics are missing." .for)) }}
  {{- end }}{{ end }}
  {{- with $r.pendingHigh }}{{ if .enabled }}
  {{- $threshold := .threshold }}
  {{- if kindIs "invalid" $threshold }}
  {{- $threshold = mul 2 (int (include "streamgroup.setting" (dict "root" $ "key" "batchSize"))) (int (include "streamgroup.maxConsumers" $)) (len (include "streamgroup.shardStreams" $ | fromJsonArray)) }}
  {{- end }}
    - alert: StreamgroupPendingHigh
      expr: sum by ({{ $by }}) (max by ({{ $perShard }}) (streamgroup_group_pending{ {{- $g -}} })) > {{ $threshold }}
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgrouppendinghigh"
        "{{ $labels.group }} on {{ $labels.stream }} has {{ $value }} pending messages"
        (printf "More than %v messages of group {{ $labels.group }} on stream {{ $labels.stream }} were delivered and not acknowledged for %s: more than the consumers can hold at once, so they are slow, failing or gone." $threshold .for)) }}
  {{- end }}{{ end }}
  {{- with $r.stuckPending }}{{ if .enabled }}
  {{- $threshold := .thresholdSeconds }}
  {{- if kindIs "invalid" $threshold }}
  {{- $claim := int (include "streamgroup.setting" (dict "root" $ "key" "claimMinIdleMs")) }}
  {{- $interval := int (include "streamgroup.setting" (dict "root" $ "key" "reclaimIntervalMs")) }}
  {{- $threshold = divf (add $claim (mul 2 $interval)) 1000 }}
  {{- end }}
    - alert: StreamgroupStuckPending
      expr: max by ({{ $by }}) (streamgroup_group_oldest_pending_idle_seconds{ {{- $g -}} }) > {{ include "streamgroup.string" $threshold }}
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgroupstuckpending"
        "A pending message of {{ $labels.group }} on {{ $labels.stream }} has been idle for {{ $value | humanizeDuration }}"
        (printf "A delivered message of group {{ $labels.group }} on stream {{ $labels.stream }} has not been touched for more than %vs, past the claim window: its consumer is gone and the reclaimer is not claiming it." (include "streamgroup.string" $threshold))) }}
  {{- end }}{{ end }}
  {{- with $r.lagGrowing }}{{ if .enabled }}
    - alert: StreamgroupLagGrowing
      expr: >-
        sum by ({{ $by }}) (max by ({{ $perShard }}) (streamgroup_group_lag{ {{- $g -}} })) > {{ .threshold }}
        and sum by ({{ $by }}) (max by ({{ $perShard }}) (delta(streamgroup_group_lag{ {{- $g -}} }[{{ .window }}]))) > 0
        and min by ({{ $by }}) (streamgroup_group_lag_known{ {{- $g -}} }) == 1
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgrouplaggrowing"
        "Lag of {{ $labels.group }} on {{ $labels.stream }} is growing ({{ $value }} undelivered)"
        (printf "Group {{ $labels.group }} on stream {{ $labels.stream }} has more than %v undelivered messages and the backlog grew over the last %s: consumers are not keeping up." .threshold .window)) }}
  {{- end }}{{ end }}
  {{- with $r.noActiveConsumer }}{{ if .enabled }}
    - alert: StreamgroupNoActiveConsumer
      # An unknown lag (lag_known 0, lag NaN) counts as "messages may wait": KEDA sees it as
      # inactive and may have scaled the consumers away.
      expr: >-
        max by ({{ $by }}) (streamgroup_group_consumers_active{ {{- $g -}} }) == 0
        and (
          max by ({{ $by }}) (streamgroup_group_lag{ {{- $g -}} }) > 0
          or min by ({{ $by }}) (streamgroup_group_lag_known{ {{- $g -}} }) == 0
        )
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgroupnoactiveconsumer"
        "No active consumer in {{ $labels.group }} on {{ $labels.stream }} while messages wait"
        "No consumer of group {{ $labels.group }} on stream {{ $labels.stream }} was seen within the last minute, yet undelivered messages are waiting (or Redis cannot tell the lag).") }}
  {{- end }}{{ end }}
  {{- with $r.shardOrphaned }}{{ if .enabled }}
    - alert: StreamgroupShardOrphaned
      # One shard's lag grows while no consumer of the group is active on it, yet consumers are
      # active on another shard: they run with fewer shards than the producer writes to, or their
      # reader of this shard is stuck. (With no consumer at all, StreamgroupNoActiveConsumer fires.)
      expr: >-
        max by ({{ $perShard }}) (deriv(streamgroup_group_lag{ {{- $g -}} }[{{ .window }}])) > 0
        and max by ({{ $perShard }}) (streamgroup_group_lag{ {{- $g -}} }) > 0
        and max by ({{ $perShard }}) (streamgroup_group_consumers_active{ {{- $g -}} }) == 0
        and on ({{ $by }}) max by ({{ $by }}) (streamgroup_group_consumers_active{ {{- $g -}} }) > 0
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgroupshardorphaned"
        "No consumer of {{ $labels.group }} reads shard {{ $labels.shard }} of {{ $labels.stream }} (its lag grows {{ $value | humanize }}/s)"
        (printf "The lag of group {{ $labels.group }} on shard {{ $labels.shard }} of stream {{ $labels.stream }} grew over the last %s and no consumer was active on that shard, while consumers are active on other shards: its messages wait for nobody." .window)) }}
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
      # No reclaimer both scraped and connected to Redis: its target is down or disconnected
      # (first part), or it has no target at all (absent keeps the selector's namespace).
      expr: >-
        (
          max by (namespace) (up{ {{- $g -}} })
          unless max by (namespace) (streamgroup_redis_connected{ {{- $g -}} } == 1)
        )
        or max by (namespace) (absent(up{ {{- $g -}} }))
      for: {{ .for }}
      {{- include "streamgroup.alertMeta" (list $ . "streamgroupreclaimerdown"
        "No streamgroup reclaimer is up and connected to Redis in {{ $labels.namespace }}"
        "No reclaimer has been scraped successfully while connected to Redis: stuck messages are not reclaimed, poison messages are not dead-lettered and the group metrics behind the other alerts are missing.") }}
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
