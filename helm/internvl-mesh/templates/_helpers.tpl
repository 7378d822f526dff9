{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "internvl-mesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: <release>-<chart>, or the release name alone when it already contains the chart name.
Truncated to 50 characters so that suffixes such as "-redis-headless" stay within 63.
*/}}
{{- define "internvl-mesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 50 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "internvl-mesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: name + instance (+ component, added by the caller). */}}
{{- define "internvl-mesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "internvl-mesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Common labels. */}}
{{- define "internvl-mesh.labels" -}}
helm.sh/chart: {{ include "internvl-mesh.chart" . }}
{{ include "internvl-mesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: internvl-mesh
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels of one component: (dict "ctx" $ "component" "redis"). */}}
{{- define "internvl-mesh.componentLabels" -}}
{{ include "internvl-mesh.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "internvl-mesh.componentSelectorLabels" -}}
{{ include "internvl-mesh.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "internvl-mesh.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "internvl-mesh.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference from one entry of .Values.images. */}}
{{- define "internvl-mesh.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- printf "%s:%s" .repository .tag }}
{{- end }}
{{- end }}

{{/* Redis: the Service host, the URL given to the mesh, and where the password lives. */}}
{{- define "internvl-mesh.redisHost" -}}
{{- printf "%s-redis" (include "internvl-mesh.fullname" .) }}
{{- end }}

{{- define "internvl-mesh.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:6379/%d" (include "internvl-mesh.redisHost" .) (int .Values.redis.database) }}
{{- else }}
{{- .Values.redis.external.url }}
{{- end }}
{{- end }}

{{- define "internvl-mesh.redisSecretName" -}}
{{- if .Values.redis.enabled }}
{{- default (printf "%s-redis" (include "internvl-mesh.fullname" .)) .Values.redis.auth.existingSecret }}
{{- else }}
{{- .Values.redis.external.existingSecret }}
{{- end }}
{{- end }}

{{- define "internvl-mesh.redisSecretKey" -}}
{{- if .Values.redis.enabled }}
{{- .Values.redis.auth.existingSecretKey }}
{{- else }}
{{- .Values.redis.external.existingSecretKey }}
{{- end }}
{{- end }}

{{/*
The Redis of the limit counters and usage records (noeviction): its Service host, its URL ("" = the
limits share the cache's Redis) and where its password lives.
*/}}
{{- define "internvl-mesh.limitsRedisHost" -}}
{{- printf "%s-limits-redis" (include "internvl-mesh.fullname" .) }}
{{- end }}

{{- define "internvl-mesh.limitsRedisUrl" -}}
{{- if .Values.limitsRedis.enabled }}
{{- printf "redis://%s:6379/0" (include "internvl-mesh.limitsRedisHost" .) }}
{{- else }}
{{- .Values.limitsRedis.external.url }}
{{- end }}
{{- end }}

{{- define "internvl-mesh.limitsRedisSecretName" -}}
{{- if .Values.limitsRedis.enabled }}
{{- default (include "internvl-mesh.limitsRedisHost" .) .Values.limitsRedis.auth.existingSecret }}
{{- else }}
{{- .Values.limitsRedis.external.existingSecret }}
{{- end }}
{{- end }}

{{- define "internvl-mesh.limitsRedisSecretKey" -}}
{{- if .Values.limitsRedis.enabled }}
{{- .Values.limitsRedis.auth.existingSecretKey }}
{{- else }}
{{- .Values.limitsRedis.external.existingSecretKey }}
{{- end }}
{{- end }}

{{- define "internvl-mesh.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "internvl-mesh.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "internvl-mesh.tenantsFile" -}}
{{- if .Values.apiKeys.enabled }}
{{- printf "%s/%s" (trimSuffix "/" .Values.apiKeys.mountPath) .Values.apiKeys.secretKey }}
{{- end }}
{{- end }}

{{/*
Deep merge with hasKey semantics (0, false and "" in the override win; maps merge key by key;
lists and scalars replace). (dict "base" $map "over" $map) -> YAML of the merged map.
*/}}
{{- define "internvl-mesh.merge" -}}
{{- $out := deepCopy .base }}
{{- range $k, $v := .over }}
{{- $b := get $out $k }}
{{- if and (kindIs "map" $v) (kindIs "map" $b) }}
{{- $_ := set $out $k (include "internvl-mesh.merge" (dict "base" $b "over" $v) | fromYaml) }}
{{- else }}
{{- $_ := set $out $k $v }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end }}

{{/* The models with modelDefaults applied, as YAML: {items: [...]}. */}}
{{- define "internvl-mesh.models" -}}
{{- $items := list }}
{{- range .Values.mesh.models }}
{{- $items = append $items (include "internvl-mesh.merge" (dict "base" $.Values.mesh.modelDefaults "over" .) | fromYaml) }}
{{- end }}
{{- toYaml (dict "items" $items) }}
{{- end }}

{{/* A Serve application name from a model name (mesh/topology.py _slug). */}}
{{- define "internvl-mesh.slug" -}}
{{- $s := regexReplaceAll "[^a-z0-9-]" (lower .) "-" | trimAll "-" | trunc 48 }}
{{- default "model" $s }}
{{- end }}

{{/*
Cross-field checks the schema cannot express; each fails with what to change.
*/}}
{{- define "internvl-mesh.validate" -}}
{{- $models := (include "internvl-mesh.models" . | fromYaml).items }}
{{- $dec := .Values.workerGroups.decoder }}
{{- $enc := .Values.workerGroups.encoder }}
{{- $names := list }}
{{- range $models }}
{{- if gt (int .tensorParallelSize) (int $dec.gpusPerPod) }}
{{- fail (printf "mesh.models[%s].tensorParallelSize is %d but workerGroups.decoder.gpusPerPod is %d: a tensor-parallel decoder replica needs all its GPUs in one pod (STRICT_PACK). Lower tensorParallelSize or raise gpusPerPod." .name (int .tensorParallelSize) (int $dec.gpusPerPod)) }}
{{- end }}
{{- if and (eq (int .tensorParallelSize) 1) (gt (float64 .decoder.numGpus) (float64 $dec.gpusPerPod)) }}
{{- fail (printf "mesh.models[%s].decoder.numGpus (%v) exceeds workerGroups.decoder.gpusPerPod (%d)." .name .decoder.numGpus (int $dec.gpusPerPod)) }}
{{- end }}
{{- if and $enc.enabled (gt (float64 .encoder.numGpus) (float64 $enc.gpusPerPod)) }}
{{- fail (printf "mesh.models[%s].encoder.numGpus (%v) exceeds workerGroups.encoder.gpusPerPod (%d)." .name .encoder.numGpus (int $enc.gpusPerPod)) }}
{{- end }}
{{- if gt (int .encoder.autoscaling.minReplicas) (int .encoder.autoscaling.maxReplicas) }}
{{- fail (printf "mesh.models[%s].encoder.autoscaling: minReplicas must not exceed maxReplicas." .name) }}
{{- end }}
{{- if gt (int .decoder.autoscaling.minReplicas) (int .decoder.autoscaling.maxReplicas) }}
{{- fail (printf "mesh.models[%s].decoder.autoscaling: minReplicas must not exceed maxReplicas." .name) }}
{{- end }}
{{- $slug := include "internvl-mesh.slug" .name }}
{{- if has $slug $names }}
{{- fail (printf "mesh.models: names must be unique once made into application names; %q collides (%s)." .name $slug) }}
{{- end }}
{{- $names = append $names $slug }}
{{- end }}
{{- range $key := list "preprocessDeployment" "gatewayDeployment" }}
{{- $a := (get $.Values.mesh $key).autoscaling }}
{{- if gt (int $a.minReplicas) (int $a.maxReplicas) }}
{{- fail (printf "mesh.%s.autoscaling: minReplicas must not exceed maxReplicas." $key) }}
{{- end }}
{{- end }}
{{- range $g := list "cpu" "encoder" "decoder" }}
{{- $w := get $.Values.workerGroups $g }}
{{- if or (gt (int $w.minReplicas) (int $w.maxReplicas)) (lt (int $w.replicas) (int $w.minReplicas)) (gt (int $w.replicas) (int $w.maxReplicas)) }}
{{- fail (printf "workerGroups.%s: need minReplicas <= replicas <= maxReplicas." $g) }}
{{- end }}
{{- end }}
{{- $gw := .Values.mesh.gateway }}
{{- if and $gw.metricsPort (has (int $gw.metricsPort) (list (int $gw.httpPort) (int $gw.grpcPort) (int .Values.observability.metricsPort))) }}
{{- fail (printf "mesh.gateway.metricsPort (%d) must differ from mesh.gateway.httpPort, mesh.gateway.grpcPort and observability.metricsPort (Ray's)." (int $gw.metricsPort)) }}
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.redis.external.url (regexMatch "^rediss?://[^/]*@" .Values.redis.external.url) }}
{{- fail "redis.external.url must not contain credentials: put the password in a Secret and name it in redis.external.existingSecret." }}
{{- end }}
{{- if and (not .Values.limitsRedis.enabled) .Values.limitsRedis.external.url (regexMatch "^rediss?://[^/]*@" .Values.limitsRedis.external.url) }}
{{- fail "limitsRedis.external.url must not contain credentials: put the password in a Secret and name it in limitsRedis.external.existingSecret." }}
{{- end }}
{{- if and (not (include "internvl-mesh.limitsRedisUrl" .)) .Values.redis.enabled (ne .Values.redis.maxmemoryPolicy "noeviction") }}
{{- fail (printf "limitsRedis is off, so rate limits and usage records would share the embedding cache's Redis, whose maxmemoryPolicy %s evicts them under cache pressure: enable limitsRedis (or give limitsRedis.external.url), or set redis.maxmemoryPolicy=noeviction." .Values.redis.maxmemoryPolicy) }}
{{- end }}
{{- if and .Values.apiKeys.enabled (not .Values.apiKeys.existingSecret) (not .Values.apiKeys.tenants) }}
{{- fail "apiKeys.enabled needs apiKeys.existingSecret (recommended) or apiKeys.tenants; set apiKeys.enabled=false to serve a single open tenant." }}
{{- end }}
{{- if and .Values.modelSource.pvc.enabled (not .Values.modelSource.pvc.claimName) }}
{{- fail "modelSource.pvc.enabled needs modelSource.pvc.claimName." }}
{{- end }}
{{- if and (not $enc.enabled) (not (hasKey .Values.workerGroups.decoder.rayResources "vision_pool")) }}
{{- range $models }}
{{- if hasKey .encoder.resources "vision_pool" }}
{{- fail "workerGroups.encoder is disabled but encoders ask for the vision_pool resource: give workerGroups.decoder.rayResources a vision_pool, or remove it from the encoders' resources." }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The Secret holding the mesh secret: yours (meshSecret.existingSecret) or the one the chart makes. */}}
{{- define "internvl-mesh.meshSecretName" -}}
{{- .Values.meshSecret.existingSecret | default (printf "%s-mesh" (include "internvl-mesh.fullname" .)) -}}
{{- end }}
