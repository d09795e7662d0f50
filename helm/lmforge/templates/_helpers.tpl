{{/*
Names, labels, validation, and the one Ray pod template used by the head and every worker group.
*/}}

{{- define "lmforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lmforge.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "lmforge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "lmforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lmforge
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Labels that select this release's pods (Ray pods and job submitters): NetworkPolicy, PodMonitor. */}}
{{- define "lmforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lmforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "lmforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lmforge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The Ray clusters of this release, as YAML `<unit>: {autoscaling: bool, serve: bool}`. A unit is
one Ray cluster and everything that talks to its Ray ports: `job-<kebab key>` for the cluster
of each job that brings its own (every enabled stage, `job-improve`), `cluster` for the shared
one (rayCluster.enabled or jobs.clusterName: every job's submitter), `serve` for the RayService.
Each unit has its own ServiceAccount, Ray token and NetworkPolicy, so one compromised job
reaches no other cluster of the release.
*/}}
{{- define "lmforge.clusterUnits" -}}
{{- $v := .Values }}
{{- $units := dict }}
{{- $shared := include "lmforge.jobsClusterName" . }}
{{- $jobs := include "lmforge.configJobs" . | fromYaml }}
{{- range $key, $job := $jobs }}
{{- $ray := include "lmforge.stageRay" (dict "root" $ "stage" $job) | fromYaml }}
{{- if not $shared }}
{{- $_ := set $units (printf "job-%s" (include "lmforge.kebab" $key)) (dict "autoscaling" $ray.autoscaling "serve" false) }}
{{- end }}
{{- end }}
{{- if or $v.rayCluster.enabled (and $shared $jobs) }}
{{- $_ := set $units "cluster" (dict "autoscaling" (and $v.rayCluster.enabled $v.ray.autoscaling) "serve" false) }}
{{- end }}
{{- if $v.serve.enabled }}
{{- $ray := mergeOverwrite (deepCopy $v.ray) (deepCopy ($v.serve.cluster | default dict)) }}
{{- $_ := set $units "serve" (dict "autoscaling" $ray.autoscaling "serve" true) }}
{{- end }}
{{- toYaml $units }}
{{- end }}

{{/* The unit (lmforge.clusterUnits) of the cluster a job runs on. Argument: dict root, key. */}}
{{- define "lmforge.jobUnit" -}}
{{- if include "lmforge.jobsClusterName" .root }}cluster{{ else }}job-{{ include "lmforge.kebab" .key }}{{ end }}
{{- end }}

{{/* The Secret (key auth_token) with a cluster's Ray token. Argument: dict root, unit. */}}
{{- define "lmforge.authSecretName" -}}
{{- $a := .root.Values.ray.auth }}
{{- $own := index ($a.existingSecrets | default dict) .unit }}
{{- $own | default $a.existingSecret | default (printf "%s-%s-ray-auth" (include "lmforge.fullname" .root) .unit) }}
{{- end }}

{{/* The ServiceAccount of a cluster's pods and its job submitters. Argument: dict root, unit. */}}
{{- define "lmforge.clusterServiceAccountName" -}}
{{- if .root.Values.serviceAccount.create }}
{{- printf "%s-%s" (include "lmforge.serviceAccountName" .root) .unit }}
{{- else }}
{{- include "lmforge.serviceAccountName" .root }}
{{- end }}
{{- end }}

{{- define "lmforge.pvcName" -}}
{{- default (printf "%s-storage" (include "lmforge.fullname" .)) .Values.storage.pvc.existingClaim }}
{{- end }}

{{/* Where stages write: the `runs_dir` put into every job config that does not set one. */}}
{{- define "lmforge.runsDir" -}}
{{- if eq .Values.storage.type "objectStore" }}
{{- .Values.storage.objectStore.uri | trimSuffix "/" }}
{{- else }}
{{- printf "%s/runs" (.Values.storage.mountPath | trimSuffix "/") }}
{{- end }}
{{- end }}

{{/* kebab-case of a stage key: prepareData -> prepare-data. */}}
{{- define "lmforge.kebab" -}}
{{- regexReplaceAll "([a-z0-9])([A-Z])" . "${1}-${2}" | lower }}
{{- end }}

{{/* The image reference. Argument: an image values dict (.Values.image, maybe merged with a stage's). */}}
{{- define "lmforge.image" -}}
{{- $tag := .image.tag | default (printf "%s-%s" .chart.AppVersion .image.flavor) }}
{{- if .image.digest }}
{{- /* The digest pins the bytes; the tag stays for people reading it (the runtime ignores it). */}}
{{- printf "%s:%s@%s" .image.repository $tag .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/*
The directory, relative to the image's workdir (the Ray processes' working directory), where the
head pod mounts the stages' config ConfigMaps; entrypoints name `job-configs/<stage>.yaml`, just
as they name `jobs/<job>.py` in the same directory.
*/}}
{{- define "lmforge.configDir" -}}job-configs{{- end }}

{{/* Name of a stage's config ConfigMap. Argument: dict root, key. */}}
{{- define "lmforge.configMapName" -}}
{{- printf "%s-%s-config" (include "lmforge.fullname" .root) (include "lmforge.kebab" .key) }}
{{- end }}

{{/*
Checks of whole-chart values that a JSON schema cannot express; each failure names the value.
*/}}
{{- define "lmforge.validate" -}}
{{- $v := .Values }}
{{- if not $v.image.repository }}
{{- fail "image.repository must be set (the lmforge image built from the repository's Dockerfile)" }}
{{- end }}
{{- range $where, $image := dict "image" $v.image "serve.image" ($v.serve.image | default dict) "improve.image" ($v.improve.image | default dict) }}
{{- if and $image.digest (not (regexMatch "^sha256:[a-f0-9]{64}$" $image.digest)) }}
{{- fail (printf "%s.digest is %q; give the image's digest as sha256:<64 hex digits> (docker buildx imagetools inspect IMAGE)" $where $image.digest) }}
{{- end }}
{{- end }}
{{- if semverCompare "<2.52.0-0" $v.ray.version }}
{{- fail (printf "ray.version is %s; Ray token authentication needs Ray >= 2.52.0" $v.ray.version) }}
{{- end }}
{{- if not (has $v.storage.type (list "pvc" "objectStore" "emptyDir")) }}
{{- fail (printf "storage.type is %q; choose pvc, objectStore or emptyDir" $v.storage.type) }}
{{- end }}
{{- if and (eq $v.storage.type "objectStore") (not (regexMatch "^(s3|gs|gcs|abfs|hdfs)://[^/]+" $v.storage.objectStore.uri)) }}
{{- fail (printf "storage.objectStore.uri is %q; with storage.type=objectStore it must be a URI like s3://bucket/prefix" $v.storage.objectStore.uri) }}
{{- end }}
{{- if and $v.jobs.clusterName $v.rayCluster.enabled }}
{{- fail "jobs.clusterName and rayCluster.enabled are both set; choose an existing cluster or the chart's own" }}
{{- end }}
{{- if and $v.jobs.kueue.queueName (or $v.jobs.clusterName $v.rayCluster.enabled) }}
{{- fail "jobs.kueue.queueName is set with jobs.clusterName / rayCluster.enabled; Kueue admits RayJobs that bring their own RayCluster only" }}
{{- end }}
{{- range $key, $stage := $v.stages }}
{{- if not (regexMatch "^[a-z][A-Za-z0-9]*$" $key) }}
{{- fail (printf "stages.%s: stage keys are camelCase names like prepareData" $key) }}
{{- end }}
{{- if $stage.enabled }}
{{- if not (regexMatch "^[a-z][a-z0-9_]*$" ($stage.job | default "")) }}
{{- fail (printf "stages.%s.job is %q; it must name jobs/<job>.py, e.g. data" $key ($stage.job | default "")) }}
{{- end }}
{{- range $i, $o := $stage.overrides }}
{{- if not (regexMatch "^[A-Za-z0-9_.]+=[^']*$" $o) }}
{{- fail (printf "stages.%s.overrides[%d] is %q; expected KEY.PATH=VALUE without single quotes" $key $i $o) }}
{{- end }}
{{- end }}
{{- $ray := include "lmforge.stageRay" (dict "root" $ "stage" $stage) | fromYaml }}
{{- $image := mergeOverwrite (deepCopy $v.image) (deepCopy ($stage.image | default dict)) }}
{{- include "lmforge.validateRay" (dict "ray" $ray "image" $image "where" (printf "stages.%s" $key)) }}
{{- end }}
{{- end }}
{{- if $v.rayCluster.enabled }}
{{- include "lmforge.validateRay" (dict "ray" $v.ray "image" $v.image "where" "rayCluster") }}
{{- end }}
{{- if $v.serve.enabled }}
{{- include "lmforge.validateServe" $ }}
{{- end }}
{{- if $v.improve.enabled }}
{{- include "lmforge.validateImprove" $ }}
{{- end }}
{{- end }}

{{/* Checks of the improvement loop's values (the RayCronJob). */}}
{{- define "lmforge.validateImprove" -}}
{{- $i := .Values.improve }}
{{- if not (regexMatch "^(@(yearly|annually|monthly|weekly|daily|midnight|hourly)|@every [0-9a-z]+|([^ ]+ ){4}[^ ]+)$" ($i.schedule | trim)) }}
{{- fail (printf "improve.schedule is %q; give a cron schedule of 5 fields like \"0 3 * * *\" or a macro like @daily" $i.schedule) }}
{{- end }}
{{- if not (regexMatch "^[a-z][a-z0-9_]*$" ($i.job | default "")) }}
{{- fail (printf "improve.job is %q; it must name jobs/<job>.py, e.g. improve" ($i.job | default "")) }}
{{- end }}
{{- range $n, $o := $i.overrides }}
{{- if not (regexMatch "^[A-Za-z0-9_.]+=[^']*$" $o) }}
{{- fail (printf "improve.overrides[%d] is %q; expected KEY.PATH=VALUE without single quotes" $n $o) }}
{{- end }}
{{- end }}
{{- if and $i.requestLogKey (not (include "lmforge.requestLogPath" .)) }}
{{- fail "improve is enabled but requestLog.path is empty: the improvement job reads the request log the RayService writes; set requestLog.path (or improve.requestLogKey=\"\" if its config names the log itself)" }}
{{- end }}
{{- $ray := include "lmforge.stageRay" (dict "root" . "stage" $i) | fromYaml }}
{{- $image := mergeOverwrite (deepCopy .Values.image) (deepCopy ($i.image | default dict)) }}
{{- include "lmforge.validateRay" (dict "ray" $ray "image" $image "where" "improve") }}
{{- end }}

{{/* Checks of the serve values (the RayService). */}}
{{- define "lmforge.validateServe" -}}
{{- $s := .Values.serve }}
{{- if not $s.apiKeys.secretName }}
{{- fail "serve.apiKeys.secretName is empty; name the Secret that holds the API keys (kubectl create secret generic lmforge-api-keys --from-literal=api-keys=...)" }}
{{- end }}
{{- if not $s.models }}
{{- fail "serve.models is empty; serve at least one model" }}
{{- end }}
{{- $image := mergeOverwrite (deepCopy .Values.image) (deepCopy ($s.image | default dict)) }}
{{- if has (int $s.port) (list 6379 8080 8265 10001) }}
{{- fail (printf "serve.port is %d, a port Ray itself uses on every pod; choose another, e.g. 8000" (int $s.port)) }}
{{- end }}
{{- range $name, $own := $s.models }}
{{- $m := mergeOverwrite (deepCopy ($s.modelDefaults | default dict)) (deepCopy $own) }}
{{- if not $m.artifact }}
{{- fail (printf "serve.models.%s.artifact is empty; set the model artifact or training run directory (relative to the runs_dir, e.g. train/base-0123456789ab, or an absolute path / URI)" $name) }}
{{- end }}
{{- $a := $m.autoscaling | default dict }}
{{- if gt (int ($a.minReplicas | default 0)) (int ($a.maxReplicas | default 1)) }}
{{- fail (printf "serve.models.%s.autoscaling.minReplicas (%d) is greater than maxReplicas (%d)" $name (int $a.minReplicas) (int $a.maxReplicas)) }}
{{- end }}
{{- if and $m.resources (gt (float64 ($m.resources.numGpus | default 0)) 0.0) (eq $image.flavor "cpu") (not $image.tag) }}
{{- fail (printf "serve.models.%s.resources.numGpus is set but the serve image flavor is cpu; set serve.image.flavor=gpu and a GPU worker group in serve.cluster" $name) }}
{{- end }}
{{- end }}
{{- $ray := mergeOverwrite (deepCopy .Values.ray) (deepCopy ($s.cluster | default dict)) }}
{{- include "lmforge.validateRay" (dict "ray" $ray "image" $image "where" "serve") }}
{{- end }}

{{/* Where the RayService's pods mount the API keys Secret. */}}
{{- define "lmforge.apiKeysDir" -}}/etc/lmforge/api-keys{{- end }}

{{/* Checks of one cluster shape. Argument: dict ray, image, where (for the message). */}}
{{- define "lmforge.validateRay" -}}
{{- $enabled := 0 }}
{{- range $name, $g := .ray.workerGroups }}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "ray.workerGroups.%s: group names must be lowercase DNS labels" $name) }}
{{- end }}
{{- if $g.enabled }}
{{- $enabled = add1 $enabled }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "ray.workerGroups.%s.minReplicas (%d) is greater than maxReplicas (%d)" $name (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "ray.workerGroups.%s.replicas (%d) is outside minReplicas..maxReplicas (%d..%d)" $name (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- if and (gt (int $g.gpus) 0) (eq $.image.flavor "cpu") (not $.image.tag) }}
{{- fail (printf "ray.workerGroups.%s.gpus is %d but image.flavor is cpu (%s); set image.flavor=gpu" $name (int $g.gpus) $.where) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* A stage's cluster shape: `ray` with the stage's `cluster` merged over it, as YAML. Argument: dict root, stage. */}}
{{- define "lmforge.stageRay" -}}
{{- toYaml (mergeOverwrite (deepCopy .root.Values.ray) (deepCopy (.stage.cluster | default dict))) }}
{{- end }}

{{/*
The Ray pod template: the ONE pod spec of the head and of every worker group (and nothing else).
Argument: dict
  root       the chart root context
  ray        the cluster shape (values `ray`, maybe merged with a stage's `cluster`)
  image      the image values dict
  group      the head or worker-group values
  role       "head" or "worker"
  configKeys stage keys whose config ConfigMaps the head mounts at <workdir>/job-configs
  stage      the stage key when the cluster belongs to one stage's RayJob (a pod label), else ""
  serve      the serve values when the cluster is the RayService's (Serve port, API keys Secret), else unset
  unit       the cluster's unit (lmforge.clusterUnits): its ServiceAccount and NetworkPolicy label
Security: restricted Pod Security profile (non-root, no privilege escalation, all capabilities
dropped, RuntimeDefault seccomp, read-only root filesystem); writable paths are emptyDirs; no
ServiceAccount token in any Ray container (an autoscaling head's sidecar alone mounts one). Ray token auth comes from the cluster's
authOptions (KubeRay injects RAY_AUTH_MODE and RAY_AUTH_TOKEN into every Ray container).
*/}}
{{- define "lmforge.rayPodTemplate" -}}
{{- $root := .root }}
{{- $v := $root.Values }}
{{- $g := .group -}}
metadata:
  labels:
    {{- include "lmforge.selectorLabels" $root | nindent 4 }}
    app.kubernetes.io/component: ray-{{ .role }}
    lmforge.dev/ray-cluster: {{ .unit }}
    {{- with .stage }}
    lmforge.dev/stage: {{ include "lmforge.kebab" . }}
    {{- end }}
    {{- with $g.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $g.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "lmforge.clusterServiceAccountName" (dict "root" $root "unit" .unit) }}
  # No container of a Ray pod sees an API token; the autoscaler sidecar mounts kube-api-access.
  automountServiceAccountToken: false
  enableServiceLinks: false
  securityContext:
    {{- include "lmforge.podSecurityContext" . | nindent 4 }}
  {{- with $v.image.pullSecrets }}
  imagePullSecrets:
    {{- range . }}
    - name: {{ . }}
    {{- end }}
  {{- end }}
  containers:
    - name: ray-{{ .role }}
      image: {{ include "lmforge.image" (dict "image" .image "chart" $root.Chart) }}
      imagePullPolicy: {{ .image.pullPolicy }}
      workingDir: {{ .image.workdir }}
      securityContext:
        {{- include "lmforge.containerSecurityContext" . | nindent 8 }}
      resources:
        {{- $res := deepCopy $g.resources }}
        {{- if gt (int $g.gpus) 0 }}
        {{- $_ := set $res.requests "nvidia.com/gpu" (int $g.gpus) }}
        {{- $_ := set $res.limits "nvidia.com/gpu" (int $g.gpus) }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      ports:
        {{- if eq .role "head" }}
        - {containerPort: 6379, name: gcs-server}
        - {containerPort: 8265, name: dashboard}
        - {containerPort: 10001, name: client}
        {{- end }}
        - {containerPort: 8080, name: metrics}
        {{- with .serve }}
        - {containerPort: {{ .port }}, name: serve}
        {{- end }}
      env:
        # The root filesystem is read-only: caches go to the ~/.cache emptyDir or /tmp.
        - {name: HOME, value: /home/ray}
        - {name: LMFORGE_HOME, value: /tmp/lmforge}
        - {name: TRITON_CACHE_DIR, value: /home/ray/.cache/triton}
        - {name: CUDA_CACHE_PATH, value: /home/ray/.cache/nv}
        - {name: MPLCONFIGDIR, value: /tmp/matplotlib}
        - {name: RAY_USAGE_STATS_ENABLED, value: "0"}
        {{- with include "lmforge.trackingUri" $root }}
        # Where every stage run (driver and training workers) logs: docs/tracking.md.
        - {name: MLFLOW_TRACKING_URI, value: {{ . | quote }}}
        {{- end }}
        {{- with $g.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if and (eq $v.storage.type "objectStore") $v.storage.objectStore.credentialsSecret }}
      envFrom:
        - secretRef:
            name: {{ $v.storage.objectStore.credentialsSecret }}
      {{- end }}
      volumeMounts:
        - {name: tmp, mountPath: /tmp}
        - {name: dshm, mountPath: /dev/shm}
        - {name: home, mountPath: /home/ray/.cache}
        {{- if ne $v.storage.type "objectStore" }}
        - {name: storage, mountPath: {{ $v.storage.mountPath }}}
        {{- end }}
        {{- if and (eq .role "head") .configKeys }}
        - {name: job-configs, mountPath: {{ printf "%s/%s" .image.workdir (include "lmforge.configDir" .) }}, readOnly: true}
        {{- end }}
        {{- if .serve }}
        - {name: api-keys, mountPath: {{ include "lmforge.apiKeysDir" . }}, readOnly: true}
        {{- end }}
  volumes:
    - name: tmp
      emptyDir: {sizeLimit: {{ $g.tmpSize }}}
    - name: dshm
      emptyDir: {medium: Memory, sizeLimit: {{ $g.shmSize }}}
    - name: home
      emptyDir: {sizeLimit: 10Gi}
    {{- if eq $v.storage.type "pvc" }}
    - name: storage
      persistentVolumeClaim: {claimName: {{ include "lmforge.pvcName" $root }}}
    {{- else if eq $v.storage.type "emptyDir" }}
    - name: storage
      emptyDir: {}
    {{- end }}
    {{- if and (eq .role "head") .configKeys }}
    - name: job-configs
      projected:
        sources:
          {{- range .configKeys }}
          - configMap:
              name: {{ include "lmforge.configMapName" (dict "root" $root "key" .) }}
              items: [{key: config.yaml, path: {{ include "lmforge.kebab" . }}.yaml}]
          {{- end }}
    {{- end }}
    {{- if and .ray.autoscaling (eq .role "head") }}
    # The head's API token, for the autoscaler sidecar only (autoscalerOptions.volumeMounts): the
    # Ray container, where job drivers run, never mounts it.
    - name: kube-api-access
      projected:
        defaultMode: 0444
        sources:
          - serviceAccountToken: {path: token, expirationSeconds: 3607}
          - configMap: {name: kube-root-ca.crt, items: [{key: ca.crt, path: ca.crt}]}
          - downwardAPI:
              items: [{path: namespace, fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}}]
    {{- end }}
    {{- with .serve }}
    - name: api-keys
      secret:
        secretName: {{ .apiKeys.secretName }}
        items: [{key: {{ .apiKeys.key }}, path: {{ .apiKeys.key }}}]
    {{- end }}
  {{- with $g.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $g.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* The MLflow tracking URI every Ray container gets: tracking.uri, else the bundled server's Service, else "" (each run logs to the embedded store under runs_dir). */}}
{{- define "lmforge.trackingUri" -}}
{{- $t := .Values.tracking }}
{{- if $t.uri }}
{{- $t.uri }}
{{- else if $t.server.enabled }}
{{- printf "http://%s-mlflow.%s.svc:%d" (include "lmforge.fullname" .) .Release.Namespace (int $t.server.port) }}
{{- end }}
{{- end }}

{{/* Pod-level securityContext of every pod (restricted profile). The rayproject/ray user is uid 1000, gid 100. */}}
{{- define "lmforge.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 100
fsGroup: 100
seccompProfile: {type: RuntimeDefault}
{{- end }}

{{/* Container-level securityContext of every container (restricted profile, read-only root). */}}
{{- define "lmforge.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities: {drop: [ALL]}
seccompProfile: {type: RuntimeDefault}
{{- end }}

{{/*
A RayCluster spec: token auth, ClusterIP head service, the head and every enabled worker group
from lmforge.rayPodTemplate. Argument: dict root, ray, image, configKeys, stage, unit (the
cluster's unit of lmforge.clusterUnits: its ServiceAccount, token and NetworkPolicy).
*/}}
{{- define "lmforge.rayClusterSpec" -}}
{{- $ctx := . -}}
rayVersion: {{ .ray.version | quote }}
authOptions:
  mode: token
  secretName: {{ include "lmforge.authSecretName" (dict "root" .root "unit" .unit) }}
enableInTreeAutoscaling: {{ .ray.autoscaling }}
{{- if .ray.autoscaling }}
autoscalerOptions:
  upscalingMode: Default
  idleTimeoutSeconds: 300
  imagePullPolicy: {{ .image.pullPolicy }}
  securityContext:
    {{- include "lmforge.containerSecurityContext" . | nindent 4 }}
  resources:
    requests: {cpu: 200m, memory: 512Mi}
    limits: {cpu: "1", memory: 1Gi}
  volumeMounts:
    - {name: kube-api-access, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
{{- end }}
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    dashboard-host: 0.0.0.0
    metrics-export-port: "8080"
    {{- with .ray.head.rayStartParams }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  template:
    {{- include "lmforge.rayPodTemplate" (merge (dict "group" .ray.head "role" "head") $ctx) | nindent 4 }}
{{- $groups := list }}
{{- range $name, $g := .ray.workerGroups }}{{ if $g.enabled }}{{ $groups = append $groups $name }}{{ end }}{{ end }}
workerGroupSpecs:{{ if not $groups }} []{{ end }}
  {{- range $name := $groups }}
  {{- $g := index $ctx.ray.workerGroups $name }}
  - groupName: {{ $name }}
    replicas: {{ $g.replicas }}
    minReplicas: {{ $g.minReplicas }}
    maxReplicas: {{ $g.maxReplicas }}
    numOfHosts: {{ $g.numOfHosts | default 1 }}
    rayStartParams:
      metrics-export-port: "8080"
      {{- with $g.rayStartParams }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    template:
      {{- include "lmforge.rayPodTemplate" (merge (dict "group" $g "role" "worker") $ctx) | nindent 6 }}
  {{- end }}
{{- end }}
