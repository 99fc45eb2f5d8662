{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "lowdiff.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart, or the release name when it already contains the chart name. */}}
{{- define "lowdiff.fullname" -}}
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

{{- define "lowdiff.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lowdiff.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lowdiff.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lowdiff.labels" -}}
helm.sh/chart: {{ include "lowdiff.chart" . }}
{{ include "lowdiff.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference
{{- end }}

{{- define "lowdiff.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lowdiff.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lowdiff.image" -}}
{{- $flavour := ternary "gpu" "cpu" .Values.gpu.enabled }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $flavour) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "lowdiff.secretName" -}}
{{- default (printf "%s-api-key" (include "lowdiff.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{/* Whether the container starts through lowdiff-prepare-engines (an engine cache is in use). */}}
{{- define "lowdiff.usesEngineCache" -}}
{{- if and .Values.engineCache.enabled (has .Values.settings.engine (list "tensorrt" "onnxruntime")) (not .Values.settings.engineDir) }}true{{ end }}
{{- end }}

{{- define "lowdiff.terminationGracePeriodSeconds" -}}
{{- $drain := add (int .Values.preStopSleepSeconds) (int (ceil .Values.settings.graceS)) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $drain 15 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) (int $drain) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed preStopSleepSeconds + settings.graceS (%v), or in-flight requests are killed mid-drain" .Values.terminationGracePeriodSeconds $drain) }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* The PromQL label matcher selecting this release's scrape targets (ServiceMonitor: namespace and service labels). */}}
{{- define "lowdiff.promSelector" -}}
namespace="{{ .Release.Namespace }}", service="{{ include "lowdiff.fullname" . }}"
{{- end }}

{{/* Checks across values that the schema cannot express. */}}
{{- define "lowdiff.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are exclusive: KEDA creates its own HorizontalPodAutoscaler" }}
{{- end }}
{{- if and (eq .Values.settings.device "cuda") (not .Values.gpu.enabled) }}
{{- fail "settings.device is cuda but gpu.enabled is false: the pod would get no GPU" }}
{{- end }}
{{- if and (eq .Values.settings.engine "tensorrt") (not .Values.engineCache.enabled) (not .Values.settings.engineDir) }}
{{- fail "settings.engine tensorrt needs prebuilt engines: enable engineCache (built per GPU type) or set settings.engineDir" }}
{{- end }}
{{- if and .Values.autoscaling.enabled (kindIs "invalid" .Values.autoscaling.targetCPUUtilizationPercentage) (kindIs "invalid" .Values.autoscaling.targetMemoryUtilizationPercentage) (not .Values.autoscaling.queueDepth.enabled) }}
{{- fail "autoscaling: give at least one metric (targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage or queueDepth)" }}
{{- end }}
{{- if and .Values.apiKey.enabled (not .Values.apiKey.existingSecret) (not .Values.apiKey.value) }}
{{- fail "apiKey.enabled: set apiKey.value or apiKey.existingSecret" }}
{{- end }}
{{- end }}
