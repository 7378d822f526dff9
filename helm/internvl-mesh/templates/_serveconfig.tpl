{{/*
The Ray Serve config (KubeRay serveConfigV2): the structure of mesh/topology.py
render_serve_config, built from .Values.mesh. tests/helm compares the two for every values file.
*/}}

{{/* DeploymentConfig.serve_options: (dict "d" $deploymentValues) -> YAML. */}}
{{- define "internvl-mesh.serveOptions" -}}
{{- $d := .d }}
{{- $actor := dict "num_cpus" $d.numCpus }}
{{- if ne (float64 $d.numGpus) 0.0 }}
{{- $_ := set $actor "num_gpus" $d.numGpus }}
{{- end }}
{{- if ne (float64 $d.memoryGb) 0.0 }}
{{- $_ := set $actor "memory" (mulf $d.memoryGb 1073741824 | floor | int64) }}
{{- end }}
{{- if $d.resources }}
{{- $_ := set $actor "resources" $d.resources }}
{{- end }}
{{- $a := $d.autoscaling }}
{{- $autoscaling := dict "min_replicas" $a.minReplicas "max_replicas" $a.maxReplicas "target_ongoing_requests" $a.targetOngoingRequests "upscale_delay_s" $a.upscaleDelayS "downscale_delay_s" $a.downscaleDelayS "look_back_period_s" ($a.lookBackPeriodS | default 30) }}
{{- /* A stage's own signals: mesh/autoscaling.py's policy (topology.AutoscalingConfig.serve_config). */}}
{{- if $a.signalTargets }}
{{- $_ := set $autoscaling "policy" (dict "policy_function" "mesh.autoscaling.SignalPolicy" "policy_kwargs" (dict "targets" $a.signalTargets)) }}
{{- end }}
{{- toYaml (dict "ray_actor_options" $actor "autoscaling_config" $autoscaling "max_ongoing_requests" $d.maxOngoingRequests "graceful_shutdown_timeout_s" $d.gracefulShutdownTimeoutS) }}
{{- end }}

{{/*
topology.decoder_options: with tensor parallelism the replica reserves every rank's GPU (and CPUs) in
one STRICT_PACK bundle, since the rank processes it spawns only see the replica's GPUs. (dict "m" $model)
*/}}
{{- define "internvl-mesh.decoderOptions" -}}
{{- $m := .m }}
{{- $opts := include "internvl-mesh.serveOptions" (dict "d" $m.decoder) | fromYaml }}
{{- /* Prefix-affinity routing to decoder replicas (services/decoder/routing.py; topology.DECODER_ROUTER). */}}
{{- $_ := set $opts "request_router_config" (dict "request_router_class" "services.decoder.routing.PrefixAffinityRouter" "request_router_kwargs" (dict "max_imbalance" 8)) }}
{{- $tp := int $m.tensorParallelSize }}
{{- if gt $tp 1 }}
{{- $cpus := mulf (maxf $m.decoder.numCpus 1.0) $tp }}
{{- $bundle := merge (dict "CPU" $cpus) ($m.decoder.resources | default dict) }}
{{- $actor := $opts.ray_actor_options }}
{{- $_ := set $actor "num_cpus" $cpus }}
{{- if ne $m.device "cpu" }}
{{- $_ := set $bundle "GPU" (float64 $tp) }}
{{- $_ := set $actor "num_gpus" (float64 $tp) }}
{{- end }}
{{- $_ := set $opts "placement_group_bundles" (list $bundle) }}
{{- $_ := set $opts "placement_group_strategy" "STRICT_PACK" }}
{{- end }}
{{- toYaml $opts }}
{{- end }}

{{/* An internal application's route: "" (rendered as null) or <prefix><app>. (dict "prefix" "app") */}}
{{- define "internvl-mesh.internalRoute" -}}
{{- if .prefix }}{{ printf "%s%s" .prefix .app }}{{ end }}
{{- end }}

{{- define "internvl-mesh.serveConfig" -}}
{{- $mesh := .Values.mesh }}
{{- $gw := $mesh.gateway }}
{{- $models := (include "internvl-mesh.models" . | fromYaml).items }}
{{- $redis := dict "url" (include "internvl-mesh.redisUrl" .) "password_env" "REDIS_PASSWORD" "limits_url" (include "internvl-mesh.limitsRedisUrl" .) "limits_password_env" "REDIS_LIMITS_PASSWORD" "key_prefix" $mesh.redis.keyPrefix "socket_timeout_s" $mesh.redis.socketTimeoutS "max_connections" $mesh.redis.maxConnections }}
{{- $cache := dict "ttl_s" $mesh.cache.ttlS "max_entry_bytes" $mesh.cache.maxEntryBytes "local_lru_bytes" $mesh.cache.localLruBytes }}
{{- /* The exporter endpoint reaches the pods as OTEL_EXPORTER_OTLP_ENDPOINT, so none is set here. */}}
{{- $tracing := dict "enabled" $mesh.tracing.enabled "service_name" $mesh.tracing.serviceName "sampling_ratio" $mesh.tracing.samplingRatio "otlp_endpoint" "" "export_delay_ms" 2000 }}
{{- $common := dict "redis" $redis "cache" $cache "grpc" (dict "max_message_bytes" $mesh.grpc.maxMessageBytes) "tracing" $tracing }}
{{- /* Internal applications have no HTTP route, unless Serve's own gRPC proxy is on: its router finds
an application by name only among those with a route (topology._internal_route). */}}
{{- $internal := ternary "/_internal/" "" (ne (int $gw.serveGrpcPort) 0) }}
{{- $apps := list }}
{{- $apps = append $apps (dict "name" "preprocess" "route_prefix" (include "internvl-mesh.internalRoute" (dict "prefix" $internal "app" "preprocess") | default nil) "import_path" "services.preprocess.deployment:build_app" "args" (dict "config" $mesh.preprocess "common" $common "deployment_options" (include "internvl-mesh.serveOptions" (dict "d" $mesh.preprocessDeployment) | fromYaml))) }}
{{- $gwModels := list }}
{{- range $m := $models }}
{{- $slug := include "internvl-mesh.slug" $m.name }}
{{- $encApp := printf "encoder-%s" $slug }}
{{- $decApp := printf "decoder-%s" $slug }}
{{- $model := dict "name" $m.name "path" $m.path "dtype" $m.dtype "device" $m.device "max_tiles_per_image" $m.maxTilesPerImage }}
{{- $apps = append $apps (dict "name" $encApp "route_prefix" (include "internvl-mesh.internalRoute" (dict "prefix" $internal "app" $encApp) | default nil) "import_path" "services.encoder.deployment:build_app" "args" (dict "model" $model "settings" $m.encoderSettings "common" $common "preprocess_app" "preprocess" "deployment_options" (include "internvl-mesh.serveOptions" (dict "d" $m.encoder) | fromYaml))) }}
{{- $apps = append $apps (dict "name" $decApp "route_prefix" (include "internvl-mesh.internalRoute" (dict "prefix" $internal "app" $decApp) | default nil) "import_path" "services.decoder.deployment:build_app" "args" (dict "model" $model "settings" $m.decoderSettings "tensor_parallel_size" $m.tensorParallelSize "common" $common "deployment_options" (include "internvl-mesh.decoderOptions" (dict "m" $m) | fromYaml))) }}
{{- $gwModels = append $gwModels (dict "name" $m.name "encoder_app" $encApp "decoder_app" $decApp "max_tiles_per_image" $m.maxTilesPerImage) }}
{{- end }}
{{- $gateway := dict "host" "0.0.0.0" "http_port" $gw.httpPort "grpc_port" $gw.grpcPort "metrics_port" $gw.metricsPort "serve_grpc_port" $gw.serveGrpcPort "tenants_file" (include "internvl-mesh.tenantsFile" .) "default_timeout_s" $gw.defaultTimeoutS "max_timeout_s" $gw.maxTimeoutS "allow_remote_images" $gw.allowRemoteImages "limits_fail_closed" $gw.limitsFailClosed }}
{{- if .Values.gatewayTls.existingSecret }}
{{- $tlsDir := trimSuffix "/" .Values.gatewayTls.mountPath }}
{{- $_ := set $gateway "ops" (dict "tls" (dict "cert_file" (printf "%s/tls.crt" $tlsDir) "key_file" (printf "%s/tls.key" $tlsDir))) }}
{{- end }}
{{- $apps = append $apps (dict "name" "gateway" "route_prefix" "/" "import_path" "gateway.deployment:build_app" "args" (dict "gateway" $gateway "models" $gwModels "preprocess_app" "preprocess" "common" $common "deployment_options" (include "internvl-mesh.serveOptions" (dict "d" $mesh.gatewayDeployment) | fromYaml))) }}
{{- $out := dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" $gw.httpPort) "applications" $apps }}
{{- if $gw.serveGrpcPort }}
{{- $fns := list "internvl.preprocess.v1.preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server" "internvl.encoder.v1.encoder_pb2_grpc.add_EncoderServiceServicer_to_server" "internvl.decoder.v1.decoder_pb2_grpc.add_DecoderServiceServicer_to_server" }}
{{- $_ := set $out "grpc_options" (dict "port" $gw.serveGrpcPort "grpc_servicer_functions" $fns) }}
{{- end }}
{{- toYaml $out }}
{{- end }}
