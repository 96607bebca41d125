{{/* Names: every object is <fullname>-<part>; fullname is the release name when it already
contains the chart name, else <release>-tensor-fusion. */}}
{{- define "tf.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tf.webhookName" -}}{{ include "tf.fullname" . }}-webhook{{- end -}}
{{- define "tf.webhookConfigurationName" -}}{{ include "tf.fullname" . }}-pod-webhook{{- end -}}
{{- define "tf.tlsSecretName" -}}{{ include "tf.fullname" . }}-webhook-tls{{- end -}}
{{- define "tf.agentName" -}}{{ include "tf.fullname" . }}-node-agent{{- end -}}
{{- define "tf.certsName" -}}{{ include "tf.fullname" . }}-certs{{- end -}}
{{- define "tf.configName" -}}{{ include "tf.fullname" . }}-config{{- end -}}

{{- define "tf.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: include "tf.selector" (list . "webhook") */}}
{{- define "tf.selector" -}}
app.kubernetes.io/name: {{ (index . 0).Chart.Name }}
app.kubernetes.io/instance: {{ (index . 0).Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* An image reference: include "tf.image" (list . .Values.controller.image) */}}
{{- define "tf.image" -}}
{{- $root := index . 0 -}}
{{- $image := index . 1 -}}
{{- printf "%s/%s:%s" $root.Values.image.registry $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}

{{- define "tf.logEnv" -}}
- name: TF_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: TF_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- end -}}

{{- define "tf.pullSecrets" -}}
{{- with .Values.image.pullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{- define "tf.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The arguments of `tensor-fusion-certs sync` the Jobs and the CronJob run. */}}
{{- define "tf.certsSyncArgs" -}}
- sync
- --namespace={{ .Release.Namespace }}
- --secret={{ include "tf.tlsSecretName" . }}
- --webhook-configuration={{ include "tf.webhookConfigurationName" . }}
- --service={{ include "tf.webhookName" . }}
- --cluster-domain={{ .Values.certificates.clusterDomain }}
{{- range .Values.certificates.dnsNames }}
- --dns={{ . }}
{{- end }}
{{- range .Values.certificates.ipAddresses }}
- --ip={{ . }}
{{- end }}
- --validity={{ .Values.certificates.validity }}
- --renew-before={{ .Values.certificates.renewBefore }}
- --ca-validity={{ .Values.certificates.caValidity }}
- --ca-renew-before={{ .Values.certificates.caRenewBefore }}
{{- end -}}

{{/* Pod spec of a certificate Job: include "tf.certsPod" (list . "<serviceAccount>" (list args...)) */}}
{{- define "tf.certsPod" -}}
{{- $root := index . 0 -}}
metadata:
  labels:
    {{- include "tf.selector" (list $root "certificates") | nindent 4 }}
  {{- with $root.Values.certificates.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ index . 1 }}
  restartPolicy: OnFailure
  {{- include "tf.pullSecrets" $root | nindent 2 }}
  securityContext:
    runAsNonRoot: true
    runAsUser: 65532
    seccompProfile:
      type: RuntimeDefault
  containers:
    - name: certs
      image: {{ include "tf.image" (list $root $root.Values.certificates.image) }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args:
        {{- index . 2 | nindent 8 }}
      env:
        {{- include "tf.logEnv" $root | nindent 8 }}
      resources:
        {{- toYaml $root.Values.certificates.resources | nindent 8 }}
      securityContext:
        {{- include "tf.restrictedContainer" $root | nindent 8 }}
{{- end -}}

{{/* Rules of the certificate Jobs: the one Secret, and the bundle of the one configuration. */}}
{{- define "tf.certsNamespacedRules" -}}
- apiGroups: [""]
  resources: [secrets]
  verbs: [create]
- apiGroups: [""]
  resources: [secrets]
  resourceNames: [{{ include "tf.tlsSecretName" . }}]
  verbs: [get, update]
{{- end -}}
{{- define "tf.certsClusterRules" -}}
- apiGroups: [admissionregistration.k8s.io]
  resources: [mutatingwebhookconfigurations]
  resourceNames: [{{ include "tf.webhookConfigurationName" . }}]
  verbs: [get, update]
{{- end -}}
