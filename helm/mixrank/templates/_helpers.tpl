{{/* Chart name, truncated to a DNS label. */}}
{{- define "mixrank.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped name. Kept to 40 characters: derived names (the training Job's pods,
     "<fullname>-train-<run>-<index>", and KubeRay's "<fullname>-raycluster-xxxxx-...")
     must fit in a 63-character DNS label. */}}
{{- define "mixrank.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mixrank.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "mixrank.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mixrank.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mixrank.labels" -}}
helm.sh/chart: {{ include "mixrank.chart" . }}
{{ include "mixrank.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The image of a component: (dict "root" $ "gpu" <bool>). */}}
{{- define "mixrank.image" -}}
{{- $root := .root }}
{{- $tag := $root.Values.image.tag }}
{{- if not $tag }}
{{- $tag = printf "%s-%s" $root.Chart.AppVersion (ternary "gpu" "cpu" .gpu) }}
{{- end }}
{{- printf "%s:%s" $root.Values.image.repository $tag }}
{{- end }}

{{- define "mixrank.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsGroup }}
fsGroup: {{ .Values.security.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "mixrank.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.security.runAsUser }}
runAsGroup: {{ .Values.security.runAsGroup }}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .Values.security.readOnlyRootFilesystem }}
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Writable scratch for a read-only root filesystem: /tmp (Ray's session dir, HOME, caches)
     and a memory-backed /dev/shm (Ray's object store, torch's shared memory). */}}
{{- define "mixrank.scratchVolumes" -}}
- name: tmp
  emptyDir: {}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSize }}
{{- end }}

{{- define "mixrank.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{- define "mixrank.scratchEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: TRITON_CACHE_DIR
  value: /tmp/.triton
{{- end }}

{{- define "mixrank.claimName" -}}
{{- default (printf "%s-data" (include "mixrank.fullname" .)) .Values.storage.existingClaim }}
{{- end }}

{{/* Training names. The Job's pods are "<job>-<index>"; with subdomain set to the headless
     Service they resolve as "<job>-<index>.<service>". */}}
{{- define "mixrank.trainJobName" -}}
{{- printf "%s-train-%s" (include "mixrank.fullname" .) .Values.training.runName | trunc 56 | trimSuffix "-" }}
{{- end }}

{{- define "mixrank.trainServiceName" -}}
{{- printf "%s-train" (include "mixrank.fullname" .) }}
{{- end }}

{{- define "mixrank.rdzvEndpoint" -}}
{{- printf "%s-0.%s:%d" (include "mixrank.trainJobName" .) (include "mixrank.trainServiceName" .) (int .Values.training.rdzvPort) }}
{{- end }}

{{- define "mixrank.runDir" -}}
{{- printf "%s/runs/%s" .Values.storage.mountPath .Values.training.runName }}
{{- end }}

{{/* True when the Prometheus Operator's API is served (or monitoring.force is set). */}}
{{- define "mixrank.promOperator" -}}
{{- if and .Values.monitoring.enabled (or .Values.monitoring.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}true{{ end }}
{{- end }}
