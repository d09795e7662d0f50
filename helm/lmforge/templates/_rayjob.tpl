{{/*
The RayJob spec of one job: every stage's RayJob (rayjobs.yaml) and the improvement loop's
RayCronJob jobTemplate (raycronjob.yaml). KubeRay creates its RayCluster (or uses an existing
one), submits `python jobs/<job>.py -c job-configs/<key>.yaml [--set ...]` through the Ray Jobs
API, follows it, and deletes the cluster after ttlSecondsAfterFinished.
Argument: dict
  root         the chart root context
  key          the job's values key (`pretrain`, `improve`): its config is job-configs/<kebab key>.yaml
  job          the job's values (job, overrides, image, cluster, and per-job copies of `jobs` defaults)
  where        the values path of the job, for messages (`stages.pretrain`, `improve`)
  clusterName  an existing RayCluster to run on (clusterSelector), or ""
  scheduled    true inside a RayCronJob: its own `suspend` applies, not the RayJob's
*/}}
{{- define "lmforge.rayJobSpec" -}}
{{- $root := .root }}
{{- $job := .job }}
{{- $d := $root.Values.jobs }}
{{- $get := dict }}
{{- range $field := list "shutdownAfterJobFinishes" "ttlSecondsAfterFinished" "backoffLimit" "activeDeadlineSeconds" "suspend" }}
{{- $_ := set $get $field (ternary (index $job $field) (index $d $field) (hasKey $job $field)) }}
{{- end }}
{{- $image := mergeOverwrite (deepCopy $root.Values.image) (deepCopy ($job.image | default dict)) }}
{{- $ray := include "lmforge.stageRay" (dict "root" $root "stage" $job) | fromYaml }}
{{- $unit := include "lmforge.jobUnit" (dict "root" $root "key" .key) }}
{{- if and .clusterName $get.suspend (not .scheduled) }}
{{- fail (printf "%s: suspend (or jobs.suspend) cannot be used with an existing cluster (jobs.clusterName / rayCluster.enabled); KubeRay does not suspend clusterSelector RayJobs" .where) }}
{{- end }}
{{- $entry := list "python" (printf "jobs/%s.py" $job.job) "-c" (printf "%s/%s.yaml" (include "lmforge.configDir" $root) (include "lmforge.kebab" .key)) }}
{{- range $job.overrides }}{{ $entry = concat $entry (list "--set" (squote .)) }}{{ end -}}
entrypoint: {{ join " " $entry | quote }}
runtimeEnvYAML: |
  env_vars:
    PYTHONUNBUFFERED: "1"
    LMFORGE_STAGE: {{ .key | quote }}
    {{- range $k, $val := $d.env }}
    {{ $k }}: {{ $val | toString | quote }}
    {{- end }}
submissionMode: K8sJobMode
{{- /* KubeRay refuses a TTL without shutdown, and never shuts down a cluster it did not create. */}}
{{- $shutdown := and $get.shutdownAfterJobFinishes (not .clusterName) }}
shutdownAfterJobFinishes: {{ $shutdown }}
ttlSecondsAfterFinished: {{ ternary $get.ttlSecondsAfterFinished 0 $shutdown }}
backoffLimit: {{ $get.backoffLimit }}
{{- if gt (int $get.activeDeadlineSeconds) 0 }}
activeDeadlineSeconds: {{ $get.activeDeadlineSeconds }}
{{- end }}
{{- if and (not .scheduled) (or $get.suspend $d.kueue.queueName) }}
suspend: true
{{- end }}
submitterConfig:
  backoffLimit: 2
submitterPodTemplate:
  metadata:
    labels:
      {{- include "lmforge.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: ray-job-submitter
      lmforge.dev/ray-cluster: {{ $unit }}
  spec:
    restartPolicy: Never
    serviceAccountName: {{ include "lmforge.clusterServiceAccountName" (dict "root" $root "unit" $unit) }}
    automountServiceAccountToken: false
    enableServiceLinks: false
    securityContext:
      {{- include "lmforge.podSecurityContext" $root | nindent 6 }}
    {{- with $root.Values.image.pullSecrets }}
    imagePullSecrets:
      {{- range . }}
      - name: {{ . }}
      {{- end }}
    {{- end }}
    containers:
      # KubeRay fills in the command (`ray job submit ... -- <entrypoint>`, then `ray job logs --follow`).
      - name: ray-job-submitter
        image: {{ include "lmforge.image" (dict "image" $image "chart" $root.Chart) }}
        imagePullPolicy: {{ $image.pullPolicy }}
        securityContext:
          {{- include "lmforge.containerSecurityContext" $root | nindent 10 }}
        env:
          - {name: HOME, value: /tmp}
          - {name: RAY_AUTH_MODE, value: token}
          - name: RAY_AUTH_TOKEN
            valueFrom:
              secretKeyRef: {name: {{ include "lmforge.authSecretName" (dict "root" $root "unit" $unit) }}, key: auth_token}
        resources:
          {{- toYaml $d.submitterResources | nindent 10 }}
        volumeMounts:
          - {name: tmp, mountPath: /tmp}
    volumes:
      - name: tmp
        emptyDir: {sizeLimit: 1Gi}
{{- if .clusterName }}
clusterSelector:
  ray.io/cluster: {{ .clusterName }}
{{- else }}
rayClusterSpec:
  {{- include "lmforge.rayClusterSpec" (dict "root" $root "ray" $ray "image" $image "configKeys" (list .key) "stage" .key "unit" $unit) | nindent 2 }}
{{- end }}
{{- end }}

{{/* The existing RayCluster every job runs on (jobs.clusterName, or the chart's own rayCluster), or "". */}}
{{- define "lmforge.jobsClusterName" -}}
{{- .Values.jobs.clusterName | default (ternary (include "lmforge.fullname" .) "" .Values.rayCluster.enabled) }}
{{- end }}

{{/*
Every job whose config the chart mounts, as YAML `key: job values`: the enabled stages, and
`improve` when the improvement loop is on.
*/}}
{{- define "lmforge.configJobs" -}}
{{- $jobs := dict }}
{{- range $key, $stage := .Values.stages }}{{ if $stage.enabled }}{{ $_ := set $jobs $key $stage }}{{ end }}{{ end }}
{{- if .Values.improve.enabled }}{{ $_ := set $jobs "improve" .Values.improve }}{{ end }}
{{- toYaml $jobs }}
{{- end }}

{{/*
The request log path (where the RayService writes requests and feedback, and the improvement
job reads them): requestLog.path, under the runs_dir when relative; "" when logging is off.
*/}}
{{- define "lmforge.requestLogPath" -}}
{{- $path := .Values.requestLog.path | default "" }}
{{- if and $path (not (or (hasPrefix "/" $path) (contains "://" $path))) }}
{{- $path = printf "%s/%s" (include "lmforge.runsDir" .) $path }}
{{- end }}
{{- $path }}
{{- end }}
