{{/*
The Deployment of one component; the three component templates only call this.
Call with (dict "root" $ "component" "consumer").
*/}}
{{- define "streamgroup.deployment" -}}
{{- $root := .root }}
{{- $values := index $root.Values .component }}
{{- $autoscaled := and (eq .component "consumer") (or $values.autoscaling.hpa.enabled $values.autoscaling.keda.enabled) }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "streamgroup.componentName" . }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "streamgroup.componentLabels" . | nindent 4 }}
spec:
  {{- if not $autoscaled }}
  replicas: {{ $values.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  {{- with $values.strategy }}
  strategy:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "streamgroup.componentSelectorLabels" . | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "streamgroup.componentLabels" . | nindent 8 }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # Roll the pods when the shared settings change.
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- with merge (dict) $values.podAnnotations $root.Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "streamgroup.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
      # No service-link variables: a Service named "<release>-redis" would otherwise inject
      # STREAMGROUP_REDIS_PORT and friends, which the services would have to tell from settings.
      enableServiceLinks: false
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml $root.Values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
      {{- with $values.initContainers }}
      initContainers:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "streamgroup.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          # The service goes in args: they replace the image's CMD and keep its ENTRYPOINT, tini,
          # as PID 1 (forwards SIGTERM, reaps zombies). A `command:` would replace tini.
          args:
            {{- toYaml $values.args | nindent 12 }}
          envFrom:
            - configMapRef:
                name: {{ include "streamgroup.fullname" $root }}
          env:
            {{- include "streamgroup.env" $root | nindent 12 }}
            {{- with $values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: metrics
              containerPort: {{ $root.Values.config.metricsPort }}
              protocol: TCP
          {{- with $values.startupProbe }}
          startupProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $values.livenessProbe }}
          livenessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $values.readinessProbe }}
          readinessProbe:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $values.lifecycle }}
          lifecycle:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          resources:
            {{- toYaml $values.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            {{- include "streamgroup.volumeMounts" $root | nindent 12 }}
            {{- with $values.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
        {{- with $values.sidecars }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      volumes:
        {{- include "streamgroup.volumes" $root | nindent 8 }}
        {{- with $values.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $values.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
