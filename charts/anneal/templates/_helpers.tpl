{{/* Labels every object of the chart carries. */}}
{{- define "anneal.labels" -}}
app.kubernetes.io/name: anneal
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{/*
The prefix of the chart's cluster-scoped objects (ClusterRoles, ClusterRoleBindings), so that two releases of
the chart can live in one cluster. Helm's convention: the release name, followed by the chart's name unless the
release name already contains it. Release `anneal` gives `anneal-operator`, `anneal-editor`; release `team-a`
gives `team-a-anneal-operator`. Release names are at most 53 characters, so no truncation is needed.
*/}}
{{- define "anneal.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name }}
{{- end }}
{{- end }}
