{{/* Pieces of the Ray pod templates shared by the head and the worker groups. */}}

{{/* Environment of a Ray container: (dict "ctx" $ "extra" $extraEnv "models" bool "gateway" bool). */}}
{{- define "internvl-mesh.rayEnv" -}}
{{- $v := .ctx.Values -}}
- name: RAY_USAGE_STATS_ENABLED
  value: "0"
- name: IVM_MESH_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "internvl-mesh.meshSecretName" .ctx }}
      key: {{ $v.meshSecret.key }}
{{- $redisSecret := include "internvl-mesh.redisSecretName" .ctx }}
{{- if $redisSecret }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $redisSecret }}
      key: {{ include "internvl-mesh.redisSecretKey" .ctx }}
{{- end }}
{{- if $v.observability.otlp.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.observability.otlp.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $v.observability.otlp.protocol | quote }}
- name: OTEL_SERVICE_NAME
  value: {{ $v.mesh.tracing.serviceName | quote }}
{{- if $v.observability.otlp.headersSecret }}
- name: OTEL_EXPORTER_OTLP_HEADERS
  valueFrom:
    secretKeyRef:
      name: {{ $v.observability.otlp.headersSecret }}
      key: {{ $v.observability.otlp.headersSecretKey }}
{{- end }}
{{- end }}
{{- if .models }}
- name: HF_HOME
  value: {{ $v.modelSource.hub.cacheDir | quote }}
{{- if $v.modelSource.hub.tokenSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $v.modelSource.hub.tokenSecret }}
      key: {{ $v.modelSource.hub.tokenSecretKey }}
{{- end }}
{{- end }}
{{- $limitsSecret := include "internvl-mesh.limitsRedisSecretName" .ctx }}
{{- if and .gateway $limitsSecret }}
- name: REDIS_LIMITS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $limitsSecret }}
      key: {{ include "internvl-mesh.limitsRedisSecretKey" .ctx }}
{{- end }}
{{- if and .gateway $v.apiKeys.enabled $v.apiKeys.hmacSecret.existingSecret }}
- name: {{ $v.apiKeys.hmacSecret.envName }}
  valueFrom:
    secretKeyRef:
      name: {{ $v.apiKeys.hmacSecret.existingSecret }}
      key: {{ $v.apiKeys.hmacSecret.key }}
{{- end }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod-level fields: (dict "ctx" $ "group" $groupValues). */}}
{{- define "internvl-mesh.podCommon" -}}
{{- $v := .ctx.Values -}}
serviceAccountName: {{ include "internvl-mesh.serviceAccountName" .ctx }}
automountServiceAccountToken: {{ $v.serviceAccount.automountToken }}
terminationGracePeriodSeconds: {{ $v.terminationGracePeriodSeconds }}
securityContext:
  {{- toYaml $v.podSecurityContext | nindent 2 }}
{{- with $v.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .group.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Pod metadata: (dict "ctx" $ "component" "cpu-worker" "group" $groupValues). */}}
{{- define "internvl-mesh.podMeta" -}}
labels:
  {{- include "internvl-mesh.componentLabels" (dict "ctx" .ctx "component" .component) | nindent 2 }}
{{- $ann := dict }}
{{- if .ctx.Values.observability.podAnnotations }}
{{- $ann = dict "prometheus.io/scrape" "true" "prometheus.io/port" (toString .ctx.Values.observability.metricsPort) "prometheus.io/path" "/metrics" }}
{{- end }}
{{- $ann = merge (deepCopy (default dict .group.podAnnotations)) $ann }}
{{- with $ann }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Liveness of a Ray worker: the raylet's health through the dashboard agent (plain HTTP). */}}
{{- define "internvl-mesh.rayletProbe" -}}
httpGet:
  path: /api/local_raylet_healthz
  port: 52365
initialDelaySeconds: 30
periodSeconds: 10
timeoutSeconds: 5
failureThreshold: 6
{{- end }}

{{/* The GPU worker groups' volumes: memory-backed /dev/shm, the model source, the download cache. */}}
{{- define "internvl-mesh.gpuVolumes" -}}
{{- $v := .ctx.Values -}}
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .group.shmSize }}
- name: hf-cache
  emptyDir:
    sizeLimit: {{ $v.modelSource.hub.cacheSizeLimit }}
{{- if $v.modelSource.pvc.enabled }}
- name: models
  persistentVolumeClaim:
    claimName: {{ $v.modelSource.pvc.claimName }}
    readOnly: true
{{- end }}
{{- end }}

{{- define "internvl-mesh.gpuVolumeMounts" -}}
{{- $v := .ctx.Values -}}
- name: dshm
  mountPath: /dev/shm
- name: hf-cache
  mountPath: {{ $v.modelSource.hub.cacheDir }}
{{- if $v.modelSource.pvc.enabled }}
- name: models
  mountPath: {{ $v.modelSource.pvc.mountPath }}
  readOnly: true
  {{- with $v.modelSource.pvc.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Container resources of a GPU group: CPU and memory from values, GPUs from gpusPerPod. */}}
{{- define "internvl-mesh.gpuResources" -}}
{{- $g := .group }}
{{- $req := merge (dict "nvidia.com/gpu" (toString $g.gpusPerPod)) (deepCopy (default dict $g.resources.requests)) }}
{{- $lim := merge (dict "nvidia.com/gpu" (toString $g.gpusPerPod)) (deepCopy (default dict $g.resources.limits)) }}
{{- toYaml (dict "requests" $req "limits" $lim) }}
{{- end }}

{{/* rayStartParams shared by the workers. */}}
{{- define "internvl-mesh.workerStartParams" -}}
metrics-export-port: {{ .ctx.Values.observability.metricsPort | quote }}
{{- if .gpus }}
num-gpus: {{ .gpus | quote }}
{{- end }}
{{- end }}
