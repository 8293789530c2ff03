{{/*
The Ray Serve config of the RayService (serveConfigV2): deploy/serve.yaml (files/serve.yaml is a
link to it, so application and deployment names, import paths and every option not set below
come from that one file), with these values applied:
  - http_options.port / grpc_options.port: serving.httpPort / serving.grpcPort (host 0.0.0.0);
  - the deployment whose user_config names an "artifact" (the model replica):
      user_config.artifact                 <- serving.artifactUri
      user_config.max_batch_size           <- serving.ranker.maxBatchSize
      user_config.batch_wait_timeout_s     <- serving.ranker.batchWaitTimeoutS
      user_config.torch_threads            <- serving.ranker.torchThreads
      user_config.device                   <- serving.ranker.device
      user_config.forward_in_thread        <- serving.ranker.forwardInThread
      user_config.log_dir                  <- serving.requestLog.dir
      user_config.log_sample_rate          <- serving.requestLog.sampleRate
      max_ongoing_requests                 <- serving.ranker.maxOngoingRequests
      num_replicas (drops autoscaling)     <- serving.ranker.replicas
      autoscaling_config (drops replicas)  <- serving.ranker.autoscaling
      ray_actor_options.num_cpus/num_gpus  <- serving.ranker.numCpus / numGpus
A null value keeps the file's setting.
*/}}
{{- define "mixrank.serveConfig" -}}
{{- $raw := .Files.Get "files/serve.yaml" }}
{{- if not $raw }}
{{- fail "files/serve.yaml (a link to deploy/serve.yaml) is missing: install the chart from a checkout of the repository or from a packaged chart" }}
{{- end }}
{{- $cfg := $raw | fromYaml }}
{{- if hasKey $cfg "Error" }}
{{- fail (printf "deploy/serve.yaml: not valid YAML: %s" $cfg.Error) }}
{{- end }}
{{- $s := .Values.serving }}
{{- $r := $s.ranker }}
{{- $http := $cfg.http_options | default dict }}
{{- $_ := set $http "host" "0.0.0.0" }}
{{- $_ := set $http "port" (int $s.httpPort) }}
{{- $_ := set $cfg "http_options" $http }}
{{- $grpc := $cfg.grpc_options | default dict }}
{{- $_ := set $grpc "port" (int $s.grpcPort) }}
{{- $_ := set $cfg "grpc_options" $grpc }}
{{- if and (not (kindIs "invalid" $r.replicas)) (not (kindIs "invalid" $r.autoscaling)) }}
{{- fail "serving.ranker: set replicas or autoscaling, not both" }}
{{- end }}
{{- $found := 0 }}
{{- range $app := $cfg.applications }}
{{- range $dep := $app.deployments }}
{{- if and (kindIs "map" $dep.user_config) (hasKey ($dep.user_config | default dict) "artifact") }}
{{- $found = add1 $found }}
{{- $uc := $dep.user_config }}
{{- $_ := set $uc "artifact" $s.artifactUri }}
{{- if not (kindIs "invalid" $r.maxBatchSize) }}{{ $_ := set $uc "max_batch_size" (int $r.maxBatchSize) }}{{ end }}
{{- if not (kindIs "invalid" $r.batchWaitTimeoutS) }}{{ $_ := set $uc "batch_wait_timeout_s" $r.batchWaitTimeoutS }}{{ end }}
{{- if not (kindIs "invalid" $r.torchThreads) }}{{ $_ := set $uc "torch_threads" (int $r.torchThreads) }}{{ end }}
{{- if not (kindIs "invalid" $r.device) }}{{ $_ := set $uc "device" $r.device }}{{ end }}
{{- if not (kindIs "invalid" $r.forwardInThread) }}{{ $_ := set $uc "forward_in_thread" $r.forwardInThread }}{{ end }}
{{- with $s.requestLog }}
{{- if not (kindIs "invalid" .dir) }}{{ $_ := set $uc "log_dir" .dir }}{{ end }}
{{- if not (kindIs "invalid" .sampleRate) }}{{ $_ := set $uc "log_sample_rate" (float64 .sampleRate) }}{{ end }}
{{- end }}
{{- if not (kindIs "invalid" $r.maxOngoingRequests) }}{{ $_ := set $dep "max_ongoing_requests" (int $r.maxOngoingRequests) }}{{ end }}
{{- if not (kindIs "invalid" $r.replicas) }}
{{- $_ := set $dep "num_replicas" (int $r.replicas) }}
{{- $_ := unset $dep "autoscaling_config" }}
{{- end }}
{{- with $r.autoscaling }}
{{- $_ := set $dep "autoscaling_config" (dict "min_replicas" (int .minReplicas) "max_replicas" (int .maxReplicas) "target_ongoing_requests" .targetOngoingRequests) }}
{{- $_ := unset $dep "num_replicas" }}
{{- end }}
{{- $opts := $dep.ray_actor_options | default dict }}
{{- if not (kindIs "invalid" $r.numCpus) }}{{ $_ := set $opts "num_cpus" $r.numCpus }}{{ end }}
{{- if not (kindIs "invalid" $r.numGpus) }}{{ $_ := set $opts "num_gpus" $r.numGpus }}{{ end }}
{{- if $opts }}{{ $_ := set $dep "ray_actor_options" $opts }}{{ end }}
{{- end }}
{{- end }}
{{- end }}
{{- if ne $found 1 }}
{{- fail (printf "deploy/serve.yaml: expected exactly one deployment whose user_config names an artifact, found %d" $found) }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* "true" when a deployment of the rendered Serve config autoscales: the Ray autoscaler then
     adds and removes worker pods (enableInTreeAutoscaling). */}}
{{- define "mixrank.serveAutoscales" -}}
{{- $cfg := include "mixrank.serveConfig" . | fromYaml }}
{{- $any := false }}
{{- range $app := $cfg.applications }}
{{- range $dep := $app.deployments }}
{{- if hasKey $dep "autoscaling_config" }}{{ $any = true }}{{ end }}
{{- end }}
{{- end }}
{{- if $any }}true{{ end }}
{{- end }}
