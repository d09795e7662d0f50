"""The serving config: which models, how many replicas, what limits, which keys.

`lmforge serve -c CONFIG`, `serve deploy jobs/serve_config.yaml` and the Helm chart's
RayService all build the same `ServeArgs` (the `args:` of the Serve config file).
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from typing import Literal

from pydantic import Field, field_validator, model_validator

from lmforge import ConfigError, storage
from lmforge.config import StrictModel


class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(1, ge=0, description="fewest replicas (0 scales to zero when idle)")
    max_replicas: int = Field(1, ge=1, description="most replicas")
    initial_replicas: int | None = Field(None, ge=0, description="replicas at start (None: min)")
    target_ongoing_requests: float = Field(
        8, gt=0, description="requests per replica the autoscaler aims for"
    )
    upscale_delay_s: float = Field(10, ge=0, description="load must persist this long to add one")
    downscale_delay_s: float = Field(300, ge=0, description="idle this long before removing one")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}"
            )
        return self


class ReplicaResources(StrictModel):
    num_cpus: float = Field(1, ge=0, description="CPUs each replica reserves")
    num_gpus: float = Field(0, ge=0, description="GPUs each replica reserves (fractions allowed)")
    memory_gb: float | None = Field(None, gt=0, description="memory each replica reserves")


class ModelServeConfig(StrictModel):
    name: str = Field(..., min_length=1, description="model id clients send as `model`")
    artifact: str = Field(
        ...,
        description="model artifact dir or training run dir (local path or URI), or a run reference: [runs_dir/]@train/NAME, or [runs_dir/]@serving for what `lmforge improve` promoted last",
    )
    device: str = Field(
        "auto", description="torch device: auto (cuda if the replica has a GPU), cpu, cuda"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="weights dtype: auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads torch uses in each replica (None: torch's default; Ray sets it "
        "to the replica's num_cpus). On a busy CPU host, 1 avoids thread oversubscription",
    )
    max_batch_size: int = Field(
        64,
        ge=1,
        description="most sequences decoded together: the KV cache gets this many slots of "
        "max_seq_len tokens, or fewer if fewer fit its memory budget; 1 turns batching off",
    )
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0,
        le=1,
        description="fraction of the GPU's memory the replica may use: the KV cache gets what "
        "is left of it after the weights, the CUDA context and a step's activations (a replica "
        "that cannot fit one max-length sequence refuses to start, saying so)",
    )
    kv_cache_gb: float | None = Field(
        None,
        gt=0,
        description="KV cache budget in GiB (None: from gpu_memory_utilization on a GPU, 2 GiB "
        "on a CPU)",
    )
    max_prefill_tokens: int = Field(
        2048,
        ge=1,
        description="prompt tokens prefilled per engine step, all admitted prompts together; a "
        "longer prompt is prefilled in chunks over several steps, so running requests keep "
        "getting tokens meanwhile",
    )
    cuda_graphs: bool = Field(
        True,
        description="on a GPU, replay decode steps from CUDA graphs (one per batch and "
        "context-length bucket, captured on first use); off: eager decode",
    )
    max_waiting: int = Field(
        256, ge=0, description="requests queued for a slot; beyond it the replica answers 503"
    )
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig, description="Serve autoscaling of this model"
    )
    resources: ReplicaResources = Field(
        default_factory=ReplicaResources, description="resources of each replica"
    )
    val_bpb: float | None = Field(
        None,
        gt=0,
        description="validation bits per byte the drift ratio compares with (None: the "
        "artifact's version.json `val_bpb`, else its run's train_summary.json)",
    )


class LimitsConfig(StrictModel):
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="longest prompt accepted (None: the model's context length)"
    )
    max_tokens: int = Field(1024, ge=0, description="largest max_tokens a request may ask")
    max_n: int = Field(8, ge=1, description="most choices (`n`) per request")
    max_prompts: int = Field(64, ge=1, description="most prompts in one completions request")
    max_concurrent_requests: int = Field(
        64, ge=1, description="requests in flight per API replica; beyond it 429 + Retry-After"
    )
    request_timeout_s: float = Field(
        120, gt=0, description="a request still generating after this answers 504"
    )
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429 and 503")
    max_body_bytes: int = Field(
        4 * 2**20,
        ge=1024,
        description="largest request body in bytes; a larger Content-Length is refused with 413 "
        "before any of it is read, a chunked body once it grows past this",
    )
    body_timeout_s: float = Field(
        30,
        gt=0,
        description="a request body not fully received this many seconds after the request "
        "arrived is refused with 408 (slow uploads cannot hold the API's request slots)",
    )
    max_prompt_chars: int | None = Field(
        None,
        ge=1,
        description="longest prompt text in characters (a chat: all its messages), refused "
        "with 400 before it is encoded (None: 32 x the prompt token limit)",
    )
    max_sequences: int = Field(
        64,
        ge=1,
        description="most sequences one request may generate (prompts x n); beyond it 400",
    )
    max_stop: int = Field(4, ge=0, description="most stop strings per request")
    max_stop_chars: int = Field(256, ge=1, description="longest stop string, in characters")
    key_max_concurrent_requests: int | None = Field(
        16,
        ge=1,
        description="requests in flight per API key per API replica, counted from before the "
        "body is read (slow uploads count) to the end of the response; beyond it 429 + "
        "Retry-After for that key only (None: only max_concurrent_requests)",
    )
    key_tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description="tokens per minute per API key per API replica (prompt tokens plus "
        "max_tokens of every sequence, reserved at admission, unused ones given back); beyond it "
        "429 with the Retry-After that frees enough (None: no token quota)",
    )


class RequestLogConfig(StrictModel):
    path: str | None = Field(
        None,
        description="where request and feedback logs go (local dir or URI; None: no log, and "
        "feedback is only counted in metrics)",
    )
    sample_rate: float = Field(
        1.0,
        ge=0,
        le=1,
        description="fraction of requests logged (chosen by a hash of the completion id, so "
        "reproducible); feedback is always logged",
    )
    flush_rows: int = Field(1000, ge=1, description="write a batch once this many rows wait")
    flush_seconds: float = Field(
        60, gt=0, description="write what waits at least this often (seconds)"
    )
    durable_feedback: bool = Field(
        True,
        description="answer feedback `stored: true` only once the row is fsynced to the "
        "replica's journal (survives a kill; compacted to Parquet on the flush triggers); "
        "false: buffered in memory like request rows, lost if the replica is killed",
    )
    spool_dir: str | None = Field(
        None,
        description="local directory of the feedback journal, which must outlive the replica "
        "(default: <path>/_spool for a local path; $LMFORGE_HOME/spool/... for a URI)",
    )
    redact_pii: bool = Field(
        True, description="replace emails, phone numbers and IPs in logged text (the `pii` step)"
    )
    recent_completions: int = Field(
        10_000,
        ge=0,
        description="completion ids each API replica remembers, to tag feedback with the model "
        "and version that answered",
    )

    @field_validator("spool_dir")
    @classmethod
    def _local_spool(cls, value: str | None) -> str | None:
        if value is not None and "://" in value:
            raise ValueError("must be a local directory (the journal is fsynced and locked)")
        return value


class DriftConfig(StrictModel):
    sample_rate: float = Field(
        0.05,
        ge=0,
        le=1,
        description="fraction of prompts scored by the model for the drift metric (0: off)",
    )
    window: int = Field(
        200, ge=1, description="the rolling prompt bits per byte is the mean of this many prompts"
    )
    queue_size: int = Field(
        64, ge=1, description="prompts waiting to be scored; beyond it new ones are skipped"
    )
    max_tokens_per_s: float = Field(
        4096,
        gt=0,
        description="prompt tokens each model replica scores per second at most (a prompt "
        "beyond the budget is not scored)",
    )
    idle_wait_s: float = Field(
        5.0,
        ge=0,
        description="a replica scores only while its engine has no request running or "
        "waiting, and waits up to this long for that; then the prompt is not scored (under "
        "steady load drift is sampled in the gaps). 0: score without waiting",
    )


class ServeArgs(StrictModel):
    """What `build_app` takes: the models, the API's limits and keys, and where to listen."""

    models: list[ModelServeConfig] = Field(..., min_length=1, description="the served models")
    limits: LimitsConfig = Field(default_factory=LimitsConfig, description="request limits")
    api_key_env: str = Field(
        "LMFORGE_API_KEYS",
        description="env var holding API keys (comma separated); keys from both sources count",
    )
    api_key_file: str | None = Field(
        None,
        description="file of API keys, one per line, `KEY` or `KEY_ID:KEY` (the id names the key "
        "in feedback records and trusted_keys; e.g. a mounted Kubernetes Secret)",
    )
    trusted_keys: list[str] | None = Field(
        None,
        description="ids of the API keys (KEY_ID in the key file, else key-<sha256 prefix>) "
        "whose feedback is marked trusted, which alone feeds `lmforge improve` by default. None: "
        "the only key when exactly one is configured, and the keyless API on the loopback (a "
        "single user: the quickstart); with several keys, none",
    )
    insecure_no_auth: bool = Field(
        False,
        description="serve a non-loopback address with no API keys (anyone who reaches the port "
        "can use it); without it, serving is refused",
    )
    host: str = Field("127.0.0.1", description="HTTP host (`lmforge serve`)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port")
    route_prefix: str = Field("/", description="HTTP route prefix of the app")
    api_replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress (router)")
    request_log: RequestLogConfig = Field(
        default_factory=RequestLogConfig, description="request and feedback logging"
    )
    drift: DriftConfig = Field(
        default_factory=DriftConfig, description="prompt drift against the validation data"
    )

    @model_validator(mode="after")
    def _unique_names(self) -> ServeArgs:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique; repeated: {', '.join(dupes)}")
        return self

    def api_keys(self) -> dict[str, str]:
        """Configured keys, {key: key id}; empty means the API is open. A key source that is
        configured but holds no key is an error: an API meant to be closed must not open."""
        keys: dict[str, str] = {}
        raw = os.environ.get(self.api_key_env)
        if raw is not None:
            found = [k.strip() for k in raw.split(",") if k.strip()]
            if not found:
                raise ConfigError(
                    f"the env var {self.api_key_env} (api_key_env) is set but holds no API key; "
                    "put keys in it (comma separated) or unset it"
                )
            keys |= {k: key_id(k) for k in found}
        if self.api_key_file:
            try:
                text = storage.read_text(self.api_key_file)
            except FileNotFoundError:
                raise ConfigError(f"api_key_file not found: {self.api_key_file}") from None
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            if not lines:
                raise ConfigError(
                    f"api_key_file {self.api_key_file} holds no API key; write one key per "
                    "line (e.g. openssl rand -hex 24), or drop api_key_file"
                )
            for line in lines:
                name, colon, key = line.partition(":")
                if colon and name.strip() and key.strip():
                    keys[key.strip()] = name.strip()
                else:
                    keys[line] = key_id(line)
        return keys

    def check_auth(self, host: str | None = None) -> dict[str, str]:
        """The keys, once it is sure that serving on `host` (default: self.host) is not open to
        others by accident: no keys on a non-loopback address needs insecure_no_auth."""
        keys = self.api_keys()
        host = self.host if host is None else host
        if not keys and not self.insecure_no_auth and not is_loopback(host):
            raise ConfigError(
                f"refusing to serve {host} with no API keys: anyone who reaches it could use "
                f"it; set {self.api_key_env} or api_key_file, bind 127.0.0.1, or pass "
                "--insecure-no-auth (insecure_no_auth: true) if that is what you mean"
            )
        return keys

    def trusted_key_ids(self, keys: dict[str, str], host: str | None = None) -> set[str]:
        """Key ids whose feedback is trusted (see `trusted_keys`)."""
        if self.trusted_keys is not None:
            return set(self.trusted_keys)
        ids = set(keys.values())
        if len(ids) == 1:
            return ids
        if not ids and not self.insecure_no_auth and is_loopback(host or self.host):
            return {ANONYMOUS}
        return set()


ANONYMOUS = "anonymous"  # the key id of requests to an API without keys


def key_id(key: str) -> str:
    """A key's name in logs and metrics: never the key, a hash prefix of it."""
    return "key-" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:12]


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
