{{/*
Chart name, overridable; 63 characters at most (DNS label).
*/}}
{{- define "labelq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-<name>, or the release name alone when it already contains
the chart name. Truncated to 63 characters (DNS label) without a trailing "-".
*/}}
{{- define "labelq.fullname" -}}
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

{{/*
Chart name and version for the helm.sh/chart label.
*/}}
{{- define "labelq.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: name and instance only (immutable in a Deployment's selector).
*/}}
{{- define "labelq.selectorLabels" -}}
app.kubernetes.io/name: {{ include "labelq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels: the selector labels plus chart, version and managed-by.
*/}}
{{- define "labelq.labels" -}}
helm.sh/chart: {{ include "labelq.chart" . }}
{{ include "labelq.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "labelq.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "labelq.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository@digest when a digest is given, else repository:tag (tag defaults to
the chart's appVersion).
*/}}
{{- define "labelq.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Name of the Secret holding the API keys: `auth.existingSecret`, else `<fullname>-api-keys` when
`auth.keys` are listed, else empty (no authentication).
*/}}
{{- define "labelq.authSecret" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecret }}
{{- else if .Values.auth.keys }}
{{- printf "%s-api-keys" (include "labelq.fullname" . | trunc 54 | trimSuffix "-") }}
{{- end }}
{{- end }}
