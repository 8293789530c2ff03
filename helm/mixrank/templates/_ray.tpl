{{/* The pod spec of a Ray node: (dict "root" $ "group" <head or workers values> "gpu" <bool>
     "head" <bool> "autoscale" <bool>). KubeRay wraps the container's start command with `ray start`; the probes
     below replace KubeRay's wget-based defaults with plain HTTP checks. */}}
{{- define "mixrank.rayPodSpec" -}}
{{- $root := .root }}
{{- $g := .group }}
{{- $s := $root.Values.serving -}}
enableServiceLinks: false
# The head's autoscaler sidecar talks to the API server (KubeRay creates its RBAC).
automountServiceAccountToken: {{ and .head .autoscale | ternary "true" "false" }}
securityContext:
  {{- include "mixrank.podSecurityContext" $root | nindent 2 }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: {{ ternary "ray-head" "ray-worker" .head }}
    image: {{ include "mixrank.image" (dict "root" $root "gpu" .gpu) }}
    imagePullPolicy: {{ $root.Values.image.pullPolicy }}
    env:
      {{- include "mixrank.scratchEnv" $root | nindent 6 }}
      {{- with $s.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    ports:
      {{- if .head }}
      - name: gcs-server
        containerPort: 6379
      - name: dashboard
        containerPort: 8265
      - name: client
        containerPort: 10001
      {{- end }}
      - name: serve
        containerPort: {{ $s.httpPort }}
      - name: grpc
        containerPort: {{ $s.grpcPort }}
      - name: metrics
        containerPort: 8080
      - name: dashboard-agent
        containerPort: 52365
    {{- if .head }}
    readinessProbe:
      httpGet:
        path: /api/gcs_healthz
        port: 8265
      initialDelaySeconds: 10
      periodSeconds: 5
      timeoutSeconds: 2
      failureThreshold: 10
    {{- else }}
    # Ready when this node's Serve proxy answers (KubeRay's own check for RayService workers).
    readinessProbe:
      httpGet:
        path: /-/healthz
        port: {{ $s.httpPort }}
      initialDelaySeconds: 10
      periodSeconds: 5
      timeoutSeconds: 2
      failureThreshold: 10
    {{- end }}
    livenessProbe:
      httpGet:
        path: /api/local_raylet_healthz
        port: 52365
      initialDelaySeconds: 30
      periodSeconds: 5
      timeoutSeconds: 2
      failureThreshold: 120
    securityContext:
      {{- include "mixrank.containerSecurityContext" $root | nindent 6 }}
    resources:
      {{- $res := deepCopy $g.resources }}
      {{- if .gpu }}
      {{- $_ := set $res "limits" (merge (dict "nvidia.com/gpu" $g.gpus) ($res.limits | default dict)) }}
      {{- end }}
      {{- toYaml $res | nindent 6 }}
    volumeMounts:
      {{- include "mixrank.scratchMounts" $root | nindent 6 }}
      {{- if $root.Values.storage.enabled }}
      - name: data
        mountPath: {{ $root.Values.storage.mountPath }}
        readOnly: {{ not (include "mixrank.logsOnVolume" $root) }}
      {{- end }}
volumes:
  {{- include "mixrank.scratchVolumes" (dict "shmSize" $g.shmSize) | nindent 2 }}
  {{- if $root.Values.storage.enabled }}
  - name: data
    persistentVolumeClaim:
      claimName: {{ include "mixrank.claimName" $root }}
      readOnly: {{ not (include "mixrank.logsOnVolume" $root) }}
  {{- end }}
{{- with $g.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $g.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* "true" when the request log is written to the shared volume: serving mounts it read-write
(otherwise read-only). Empty otherwise. */}}
{{- define "mixrank.logsOnVolume" -}}
{{- $dir := .Values.serving.requestLog.dir | default "" }}
{{- if and .Values.storage.enabled $dir (hasPrefix .Values.storage.mountPath $dir) }}true{{ end }}
{{- end }}
