"""The Ray Serve application: one autoscaled deployment per model behind one HTTP router.

    build_app(ServeArgs)  ->  Router (FastAPI ingress: auth, validation, limits, metrics)
                                 -> ModelServer "model-<name>" (an Engine per replica)

`serve run lmforge.serve.app:build_app`, `serve deploy jobs/serve_config.yaml`, the Helm
chart's RayService and `lmforge serve` all deploy this same application. Serve calls the
builder with the `args:` mapping of the config file and validates it as `ServeArgs` (a typed
builder); `lmforge serve` and the quickstart, which know the address they bind, call
`application` once their keys were checked against it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from lmforge.model.generate import SamplingParams
from lmforge.serve.config import DriftConfig, ModelServeConfig, ServeArgs
from lmforge.serve.drift import DriftScorer, served_model_info
from lmforge.serve.engine import EngineOverloaded, Output, load_engine

log = logging.getLogger(__name__)
DRAIN_S = 30.0  # a stopping replica lets running requests finish for this long


class ModelServer:
    """One replica of one model: an Engine whose thread decodes every request it holds."""

    def __init__(self, cfg: dict, drift: dict | None = None) -> None:
        self.cfg = ModelServeConfig.model_validate(cfg)
        self.engine = load_engine(self.cfg).start()
        self.drift = DriftScorer(self.engine, DriftConfig.model_validate(drift or {}))

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Output]:
        async for out in self.engine.stream(prompt, params):
            yield out

    async def score(self, text: str) -> float | None:
        """Bits per byte of a prompt (drift), in a thread beside the decoding one."""
        return await asyncio.to_thread(self.drift, text, self.engine.special.prefix_id)

    def check_health(self) -> None:
        if not self.engine.healthy():
            raise RuntimeError(f"engine of {self.cfg.name} is down: {self.engine.last_error}")

    def __del__(self) -> None:
        # Serve first stops routing here and waits for ongoing requests (graceful shutdown);
        # whatever is left gets DRAIN_S more, then is cancelled.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(drain_s=DRAIN_S)


class ServeBackend:
    """A model deployment as the API's Backend: streamed calls through its handle."""

    def __init__(self, cfg: ModelServeConfig, handle: DeploymentHandle) -> None:
        from tokenizers import Tokenizer

        from lmforge import storage
        from lmforge.model.artifact import TOKENIZER, load_model_config, resolve_artifact
        from lmforge.model.special import load_special_tokens

        directory = resolve_artifact(cfg.artifact)
        self.name, self.handle = cfg.name, handle.options(stream=True)
        self.score_handle = handle
        self.info = served_model_info(directory, cfg.val_bpb)
        self.tokenizer = Tokenizer.from_str(storage.read_text(storage.join(directory, TOKENIZER)))
        self.special = load_special_tokens(directory, self.tokenizer)
        self.max_seq_len = load_model_config(directory).max_seq_len

    async def generate(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[Output]:
        from ray.serve.exceptions import BackPressureError

        response = self.handle.generate.remote(prompt, params)
        finished = False
        try:
            async for out in response:
                finished = out.finish_reason is not None
                yield out
        except BackPressureError as e:
            raise EngineOverloaded(str(e)) from None
        except Exception as e:
            if isinstance(e, EngineOverloaded) or "EngineOverloaded" in str(e):
                raise EngineOverloaded(str(e).splitlines()[-1]) from None
            raise
        finally:
            if not finished:
                response.cancel()  # the client left: the replica drops the request

    async def healthy(self) -> bool:
        return True  # Serve health-checks every model replica itself (check_health)

    async def score(self, text: str) -> float | None:
        return await self.score_handle.score.remote(text)


class Router:
    """The HTTP ingress: the OpenAI-compatible FastAPI app over the model deployments."""

    def __init__(self, args: dict, models: dict[str, DeploymentHandle]) -> None:
        self.args = ServeArgs.model_validate(args)
        configs = {m.name: m for m in self.args.models}
        self.backends = {name: ServeBackend(configs[name], h) for name, h in models.items()}

    def __serve_build_asgi_app__(self):
        from lmforge.serve.openai import create_app
        from lmforge.serve.requestlog import default_replica

        # (`self.app` is taken: the ingress wrapper's own property). The metrics go through
        # Ray's metrics agent: its port is the one Prometheus scrapes on a Ray cluster.
        self.api = create_app(self.backends, self.args, replica=default_replica(), ray_metrics=True)
        return self.api

    def __del__(self) -> None:
        # A stopping router writes its buffered request and feedback rows. Serve runs the
        # app's shutdown hook first (which already does), an exiting process atexit; closing
        # twice writes nothing twice.
        api = getattr(self, "api", None)
        if api is not None:
            api.state.request_log.close()


def deployment_options(cfg: ModelServeConfig) -> dict:
    """Serve options of a model's deployment, from its config."""
    a, r = cfg.autoscaling, cfg.resources
    actor = {"num_cpus": r.num_cpus, "num_gpus": r.num_gpus}
    if r.memory_gb:
        actor["memory"] = int(r.memory_gb * 2**30)
    return {
        "name": f"model-{cfg.name}",
        "autoscaling_config": {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "initial_replicas": a.initial_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
        },
        "ray_actor_options": actor,
        # Everything a replica can hold: its batch plus its queue (beyond it, Serve queues).
        "max_ongoing_requests": cfg.max_batch_size + max(cfg.max_waiting, 1),
        "health_check_period_s": 10,
        "health_check_timeout_s": 30,
        "graceful_shutdown_wait_loop_s": 2,
        "graceful_shutdown_timeout_s": DRAIN_S + 10,
    }


def build_app(args: ServeArgs) -> Application:
    """The Serve application of a Serve config file's `args` (the typed builder `serve
    run/deploy` and the chart's RayService call). Its proxy listens where the file's
    http_options say, on every node, which the app cannot see: it is taken as exposed, so
    it needs API keys unless `insecure_no_auth`."""
    if isinstance(args, dict):
        args = ServeArgs.model_validate(args)
    args.check_auth(host="0.0.0.0")
    return application(args)


def application(args: ServeArgs) -> Application:
    """The Serve application of `args`, once the caller checked its keys against the address
    it serves (`lmforge serve`, the quickstart: ServeArgs.check_auth)."""
    models = {
        m.name: serve.deployment(ModelServer)
        .options(**deployment_options(m))
        .bind(m.model_dump(), args.drift.model_dump())
        for m in args.models
    }
    router = serve.deployment(serve.ingress()(Router)).options(
        name="router",
        num_replicas=args.api_replicas,
        ray_actor_options={"num_cpus": 0.1},
        max_ongoing_requests=args.limits.max_concurrent_requests * 2,
    )
    return router.bind(args.model_dump(), models)
