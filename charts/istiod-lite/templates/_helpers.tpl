{{/* Labels every object of the chart carries. */}}
{{- define "istiod-lite.labels" -}}
app.kubernetes.io/name: istiod
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ambit
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end }}

{{/* <hub>/<name>:<tag> with the per-image overrides. Arguments: root, the image's values. */}}
{{- define "istiod-lite.image" -}}
{{- $root := index . 0 -}}
{{- $img := index . 1 -}}
{{- $hub := $img.hub | default $root.Values.global.hub -}}
{{- $tag := $img.tag | default $root.Values.global.tag | default $root.Chart.AppVersion -}}
{{- printf "%s/%s:%s" $hub $img.image $tag -}}
{{- end }}

{{- define "istiod-lite.xdsAddress" -}}
{{- .Values.waypoint.xdsAddress | default (printf "https://istiod.%s.svc:15012" .Release.Namespace) -}}
{{- end }}
