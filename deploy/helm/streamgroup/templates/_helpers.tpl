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

{{/* The version label follows the deployed image: image.tag, else the chart's appVersion. */}}
{{- define "streamgroup.version" -}}
{{- default .Chart.AppVersion .Values.image.tag | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The recommended label set; on every object and every pod (with commonLabels). */}}
{{- define "streamgroup.labels" -}}
helm.sh/chart: {{ include "streamgroup.chart" . }}
{{ include "streamgroup.selectorLabels" . }}
app.kubernetes.io/version: {{ include "streamgroup.version" . | quote }}
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

{{/* An image pinned by digest: repository:tag@digest (the tag only documents it). */}}
{{- define "streamgroup.pinnedImage" -}}
{{- if .digest }}
{{- printf "%s:%s@%s" .repository .tag .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{- define "streamgroup.redisName" -}}
{{- include "streamgroup.componentName" (dict "root" . "component" "redis") }}
{{- end }}

{{/* The bundled Redis' address as any namespace resolves it (KEDA's operator runs in its own). */}}
{{- define "streamgroup.redisHost" -}}
{{- printf "%s.%s.svc" (include "streamgroup.redisName" .) .Release.Namespace }}
{{- end }}

{{/* The Redis URL the services use, without a password (that comes from a file); the ACL user of
redis.auth.username goes into the URL's user part. */}}
{{- define "streamgroup.redisUrl" -}}
{{- $url := "" }}
{{- if .Values.redis.bundled.enabled }}
{{- $url = printf "redis://%s:6379/0" (include "streamgroup.redisHost" .) }}
{{- else }}
{{- $url = required "redis.external.url is required when redis.bundled.enabled is false" .Values.redis.external.url }}
{{- end }}
{{- with .Values.redis.auth.username }}
{{- $parsed := urlParse $url }}
{{- if $parsed.userinfo }}
{{- fail "redis.auth.username: put the user either in redis.external.url or in redis.auth.username, not both" }}
{{- end }}
{{- $url = urlJoin (set $parsed "userinfo" .) }}
{{- end }}
{{- $url }}
{{- end }}

{{/* Name of the Secret holding the Redis password: the existing one, else the one the chart
generates for the bundled Redis; empty when there is no password. */}}
{{- define "streamgroup.passwordSecret" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecret }}
{{- else if .Values.redis.bundled.enabled }}
{{- printf "%s-password" (include "streamgroup.redisName" .) }}
{{- end }}
{{- end }}

{{- define "streamgroup.passwordKey" -}}
{{- if .Values.redis.auth.existingSecret }}
{{- .Values.redis.auth.existingSecretPasswordKey }}
{{- else }}
{{- print "password" }}
{{- end }}
{{- end }}

{{/* A Kubernetes memory quantity (512Mi, 1Gi, 500M, 1073741824) in bytes. */}}
{{- define "streamgroup.bytes" -}}
{{- $q := toString . }}
{{- $units := dict "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 }}
{{- $number := regexFind "^[0-9]+" $q }}
{{- $unit := trimPrefix $number $q }}
{{- if not $number }}{{ fail (printf "cannot read the memory quantity %q" $q) }}{{ end }}
{{- if $unit }}
{{- if not (hasKey $units $unit) }}{{ fail (printf "cannot read the memory quantity %q" $q) }}{{ end }}
{{- mul (int64 $number) (index $units $unit) }}
{{- else }}
{{- int64 $number }}
{{- end }}
{{- end }}

{{/* The bundled Redis' maxmemory: the value, else 75% of its container memory limit. */}}
{{- define "streamgroup.redisMaxmemory" -}}
{{- $redis := .Values.redis.bundled }}
{{- if $redis.maxmemory }}
{{- include "streamgroup.bytes" $redis.maxmemory }}
{{- else }}
{{- $limit := dig "limits" "memory" "" $redis.resources }}
{{- if not $limit }}{{ fail "redis.bundled: set resources.limits.memory (maxmemory is 75% of it) or redis.bundled.maxmemory" }}{{ end }}
{{- div (mul (int64 (include "streamgroup.bytes" $limit)) 3) 4 }}
{{- end }}
{{- end }}

{{/* The most consumer pods this release may run. */}}
{{- define "streamgroup.maxConsumers" -}}
{{- $c := .Values.consumer }}
{{- if $c.autoscaling.keda.enabled }}{{ $c.autoscaling.keda.maxReplicaCount }}
{{- else if $c.autoscaling.hpa.enabled }}{{ $c.autoscaling.hpa.maxReplicas }}
{{- else }}{{ $c.replicas }}{{ end }}
{{- end }}

{{/* A config value, else the service's default (they must match services/streamgroup/settings.py). */}}
{{- define "streamgroup.setting" -}}
{{- $defaults := dict "batchSize" 100 "blockMs" 2000 "redisTimeoutMs" 10000 "shutdownGraceSeconds" 20 "claimMinIdleMs" 60000 "reclaimIntervalMs" 5000 }}
{{- $value := index .root.Values.config .key }}
{{- if kindIs "invalid" $value }}{{ index $defaults .key }}{{ else }}{{ $value }}{{ end }}
{{- end }}

{{/* A value as a string; whole numbers without the exponent YAML-decoded floats print with (1e+06). */}}
{{- define "streamgroup.string" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}
{{- int64 . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/* How the services reach Redis, as KEDA must be told: standalone, cluster or sentinel (auto
with sentinels is Sentinel, as for the services; auto without is one server). */}}
{{- define "streamgroup.redisMode" -}}
{{- $redis := .Values.redis }}
{{- if eq $redis.mode "auto" }}{{ ternary "sentinel" "standalone" (gt (len $redis.sentinels) 0) }}
{{- else }}{{ $redis.mode }}{{ end }}
{{- end }}

{{/* Number of stream shards (config.shards; null is the services' default, 1). */}}
{{- define "streamgroup.shards" -}}
{{- $shards := .Values.config.shards }}
{{- if kindIs "invalid" $shards }}1{{ else }}{{ int $shards }}{{ end }}
{{- end }}

{{/* The stream keys of one shard layout as a JSON list, as services/streamgroup/keys.py
(shard_keys) names them: one shard is the stream itself; N shards are "{<stream>:i}", the braces
of the name dropped. Call with (list $stream $shards). */}}
{{- define "streamgroup.shardLayout" -}}
{{- $stream := index . 0 }}
{{- $shards := int (index . 1) }}
{{- if eq $shards 1 }}
{{- list $stream | toJson }}
{{- else }}
{{- $base := $stream | replace "{" "" | replace "}" "" }}
{{- $keys := list }}
{{- range $i := until $shards }}
{{- $keys = append $keys (printf "{%s:%d}" $base $i) }}
{{- end }}
{{- $keys | toJson }}
{{- end }}
{{- end }}

{{/* The stream keys consumers and the reclaimer read, in the order of their `shard` label
(keys.read_shards): the current layout's, then, while config.previousShards is set, the old
layout's that are not among them. */}}
{{- define "streamgroup.shardStreams" -}}
{{- $stream := .Values.config.stream }}
{{- $keys := include "streamgroup.shardLayout" (list $stream (include "streamgroup.shards" .)) | fromJsonArray }}
{{- with .Values.config.previousShards }}
{{- range include "streamgroup.shardLayout" (list $stream .) | fromJsonArray }}
{{- if not (has . $keys) }}
{{- $keys = append $keys . }}
{{- end }}
{{- end }}
{{- end }}
{{- $keys | toJson }}
{{- end }}

{{/* What Redis Cluster hashes of a key (keys.hash_tag): the text between its first "{" and the
next "}" if not empty, else the whole key. Keys with the same hashed part share a slot. */}}
{{- define "streamgroup.hashedPart" -}}
{{- $tag := regexFind "\\{[^}]*\\}" . | trimPrefix "{" | trimSuffix "}" }}
{{- default . $tag }}
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
{{- $grace := float64 (include "streamgroup.setting" (dict "root" . "key" "shutdownGraceSeconds")) }}
{{- $block := divf (float64 (include "streamgroup.setting" (dict "root" . "key" "blockMs"))) 1000 }}
{{- $timeout := divf (float64 (include "streamgroup.setting" (dict "root" . "key" "redisTimeoutMs"))) 1000 }}
{{- $needed := addf $grace $block (mulf 2 $timeout) }}
{{- if lt (float64 .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be at least config.shutdownGraceSeconds + config.blockMs + 2 x config.redisTimeoutMs = %v s, or a stopping consumer is killed before it has acknowledged its work" .Values.terminationGracePeriodSeconds (ceil $needed)) }}
{{- end }}
{{- if and $autoscaling.keda.enabled (eq (int $autoscaling.keda.minReplicaCount) 0) }}
{{- fail "consumer.autoscaling.keda.minReplicaCount: 0 is refused: KEDA's redis-streams scaler treats an unknown lag (nil after a Redis restart from its append-only file, until a consumer reads) as inactive, and no consumer would ever read again. Use 1 or more (docs/deploy.md)" }}
{{- end }}
{{- if ne (empty .Values.redis.tls.certKey) (empty .Values.redis.tls.keyKey) }}
{{- fail "redis.tls.certKey and redis.tls.keyKey go together" }}
{{- end }}
{{- $mode := .Values.redis.mode }}
{{- if and .Values.redis.bundled.enabled (has $mode (list "cluster" "sentinel")) }}
{{- fail (printf "redis.mode=%s needs an external Redis: the bundled Redis is one server, neither a cluster nor watched by sentinels. Set redis.bundled.enabled=false and redis.external.url (%s)" $mode (ternary "any node of the cluster" "its user, TLS and database; the sentinels name the primary" (eq $mode "cluster"))) }}
{{- end }}
{{- if and .Values.redis.bundled.enabled (gt (len .Values.redis.sentinels) 0) }}
{{- fail "redis.sentinels: the bundled Redis is not watched by sentinels; use them with an external Redis (redis.bundled.enabled=false, redis.mode=sentinel)" }}
{{- end }}
{{- if eq $mode "cluster" }}
{{- $db := trimPrefix "/" (urlParse (include "streamgroup.redisUrl" .)).path }}
{{- if not (has $db (list "" "0")) }}
{{- fail (printf "redis.external.url: a Redis Cluster has only database 0, the URL names database %s" $db) }}
{{- end }}
{{- /* One shard: the dead-letter script moves entries between the stream and its dead-letter
stream, which must share a hash slot (the services refuse to start otherwise). N shards get
hash tags of their own. */}}
{{- if eq (include "streamgroup.shards" .) "1" }}
{{- $stream := .Values.config.stream }}
{{- $dead := default (printf "%s:dead" $stream) .Values.config.deadLetterStream }}
{{- if ne (include "streamgroup.hashedPart" $stream) (include "streamgroup.hashedPart" $dead) }}
{{- fail (printf "config.stream %q and its dead-letter stream %q would be in different Redis Cluster hash slots, and the services refuse to start so (dead-lettering moves an entry between them in one script): give the stream a hash tag, e.g. config.stream={%s} (dead letters then go to {%s}:dead), or use config.shards > 1" $stream $dead ($stream | replace "{" "" | replace "}" "") ($stream | replace "{" "" | replace "}" "")) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes and mounts shared by every streamgroup pod (also the test pod). */}}
{{- define "streamgroup.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with include "streamgroup.passwordSecret" . }}
- name: redis-password
  secret:
    secretName: {{ . }}
    defaultMode: 0440
    items:
      - key: {{ include "streamgroup.passwordKey" $ }}
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
{{- if include "streamgroup.passwordSecret" . }}
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
{{- if include "streamgroup.passwordSecret" . }}
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
{{- default (printf "job=%q, namespace=%q" (printf "%s/%s" .Release.Namespace (include "streamgroup.fullname" .)) .Release.Namespace) .Values.prometheusRule.selector }}
{{- end }}
