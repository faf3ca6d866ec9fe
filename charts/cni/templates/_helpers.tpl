{{- define "cni.labels" -}}
app.kubernetes.io/name: ambit-cni
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ambit
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end }}

{{- define "cni.image" -}}
{{- $hub := .Values.hub | default .Values.global.hub -}}
{{- $tag := .Values.tag | default .Values.global.tag | default .Chart.AppVersion -}}
{{- printf "%s/%s:%s" $hub .Values.image $tag -}}
{{- end }}
