"""The whole mesh as one validated config, and the one Ray Serve config rendered from it.

``internvl-mesh serve`` deploys what ``render_serve_config`` returns; ``internvl-mesh config render``
prints it for ``serve deploy`` and KubeRay's ``serveConfigV2`` (the Helm chart renders the same
structure from its values, and a test compares the two). Secrets never appear in it: the Redis
password and API keys are named by environment variable / file path, filled in by the platform.

Applications (one Serve application per service, plus the gateway as the ingress):

- ``preprocess``: the CPU pool (``num_cpus``);
- ``encoder-<model>``: the vision pool (``num_gpus`` + the ``vision_pool`` custom resource on GPU);
- ``decoder-<model>``: the language pool; with tensor parallelism a placement group of one bundle
  per rank (``STRICT_PACK``);
- ``gateway``: the public HTTP API on ``/`` (Serve's HTTP proxy), the public gRPC API on its own
  port, and Prometheus metrics on another (each gateway replica runs both listeners, bound to
  ``gateway.host``; SO_REUSEPORT lets replicas on one node share them).

Internal applications have no HTTP route (``route_prefix: null``): nothing of theirs is reachable
through Serve's HTTP proxy, and the gateway reaches them through DeploymentHandles by application
name. The one exception is Serve's own gRPC proxy (``gateway.serve_grpc_port``, off by default, for
development only): it routes by the ``application`` metadata, but Ray Serve 2.60's proxy router knows
only applications that have a route, so while it is on the internal applications get an
``/_internal/<app>`` route again (Serve's HTTP proxy then answers those paths with 500s: they define
no HTTP handler).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, field_validator, model_validator

from gateway.config import GatewayAppArgs, GatewaySettings
from mesh.autoscaling import SIGNALS, policy_config
from services.common.config import CommonConfig, ModelConfig, StrictModel, build
from services.decoder.config import DecoderAppArgs, DecoderSettings
from services.encoder.config import EncoderAppArgs, EncoderSettings
from services.preprocess.config import PreprocessAppArgs, PreprocessConfig

INTERNAL_PREFIX = "/_internal"
PREPROCESS_BUILDER = "services.preprocess.deployment:build_app"
ENCODER_BUILDER = "services.encoder.deployment:build_app"
DECODER_BUILDER = "services.decoder.deployment:build_app"
GATEWAY_BUILDER = "gateway.deployment:build_app"
# Requests to decoder replicas are routed by prefix affinity (services/decoder/routing.py; the chart
# renders the same). Serve's default router is the power of two choices by load.
DECODER_ROUTER = {
    "request_router_class": "services.decoder.routing.PrefixAffinityRouter",
    "request_router_kwargs": {"max_imbalance": 8},
}


class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(default=1, ge=0, le=1000)
    max_replicas: int = Field(default=4, ge=1, le=1000)
    target_ongoing_requests: float = Field(default=8, gt=0, le=10_000)
    upscale_delay_s: float = Field(default=10.0, ge=0, le=3600)
    downscale_delay_s: float = Field(default=120.0, ge=0, le=86_400)
    look_back_period_s: float = Field(
        default=30.0, gt=0, le=3600, description="Window over which Serve averages the signals."
    )
    signal_targets: dict[str, float] = Field(
        default_factory=dict,
        description=(
            "Per-replica targets of the stage's own signals (mesh/autoscaling.py: tiles_waiting, "
            "queue_depth, waiting_tokens, kv_usage): replicas = max over the signals of their sum over "
            "the replicas / target. Empty: Serve's own policy on target_ongoing_requests."
        ),
    )

    @model_validator(mode="after")
    def _order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        unknown = set(self.signal_targets) - set(SIGNALS)
        if unknown:
            raise ValueError(f"signal_targets: unknown signals {sorted(unknown)}; known: {list(SIGNALS)}")
        if any(t <= 0 for t in self.signal_targets.values()):
            raise ValueError("signal_targets: every target must be > 0")
        return self

    def serve_config(self) -> dict[str, Any]:
        """Serve's ``autoscaling_config``: with signal targets, our policy on the replicas' own stats."""
        out = self.model_dump(exclude={"signal_targets"})
        if self.signal_targets:
            out["policy"] = policy_config(self.signal_targets)
        return out


class DeploymentConfig(StrictModel):
    """Resources and scaling of one Serve deployment."""

    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    num_cpus: float = Field(default=1.0, ge=0, le=1024)
    num_gpus: float = Field(default=0.0, ge=0, le=64)
    memory_gb: float = Field(default=0.0, ge=0, le=4096, description="Ray memory reservation; 0 = none.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources.")
    max_ongoing_requests: int = Field(default=32, ge=1, le=100_000)
    graceful_shutdown_timeout_s: float = Field(default=30.0, ge=0, le=3600)
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="OMP_NUM_THREADS of the replica (Ray sets 1 for fractional-CPU actors); None: Ray's.",
    )

    def serve_options(self) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        if self.memory_gb:
            actor["memory"] = int(self.memory_gb * 1024**3)
        if self.resources:
            actor["resources"] = dict(self.resources)
        if self.torch_threads:
            actor["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(self.torch_threads)}}
        return {
            "ray_actor_options": actor,
            "autoscaling_config": self.autoscaling.serve_config(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }


def _cpu_pool() -> DeploymentConfig:
    return DeploymentConfig(
        autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=4)
    )


# Where a backlog waits. Serve's router queues a deployment's requests beyond ``max_ongoing_requests``
# per replica in arrival order, where no fair share sees them; so the defaults let the backlog into the
# replicas, to wait in the decoder's fair queue (its scheduler) and the encoder's tile batcher. A decoder
# replica takes DECODER_QUEUE_FACTOR times its ``max_num_seqs``: a full batch and three batches waiting.
# An encoder replica takes ENCODER_ONGOING requests (the batcher bounds its queue in tiles,
# ``max_queued_tiles``, and answers RESOURCE_EXHAUSTED beyond it). A gateway replica streams every
# request it holds, so it takes GATEWAY_ONGOING. Values set in the config win.
DECODER_QUEUE_FACTOR = 4
ENCODER_ONGOING = 256
GATEWAY_ONGOING = 256


def _gateway_pool() -> DeploymentConfig:
    pool = _cpu_pool()
    pool.max_ongoing_requests = GATEWAY_ONGOING
    return pool


def _preprocess_pool() -> DeploymentConfig:
    return DeploymentConfig(
        autoscaling=AutoscalingConfig(
            min_replicas=1, max_replicas=8, target_ongoing_requests=4, signal_targets={"queue_depth": 8}
        )
    )


def _vision_pool() -> DeploymentConfig:
    return DeploymentConfig(autoscaling=AutoscalingConfig(signal_targets={"tiles_waiting": 64}))


class ServedModel(ModelConfig):
    """A model with its two pools."""

    tensor_parallel_size: int = Field(default=1, ge=1, le=64)
    encoder: DeploymentConfig = Field(default_factory=_vision_pool)
    decoder: DeploymentConfig = Field(default_factory=DeploymentConfig)
    encoder_settings: EncoderSettings = Field(
        default_factory=EncoderSettings, description="The encoder's settings (services.encoder.config)."
    )
    decoder_settings: DecoderSettings = Field(
        default_factory=DecoderSettings, description="The decoder's settings (services.decoder.config)."
    )

    @model_validator(mode="after")
    def _backlog_in_the_fair_queues(self) -> ServedModel:
        """Unless set, ``max_ongoing_requests`` lets the backlog into the replicas (see DECODER_QUEUE_FACTOR)."""
        if "max_ongoing_requests" not in self.decoder.model_fields_set:
            factor = DECODER_QUEUE_FACTOR * self.decoder_settings.scheduler.max_num_seqs
            self.decoder.__dict__["max_ongoing_requests"] = max(32, min(100_000, factor))
        if "max_ongoing_requests" not in self.encoder.model_fields_set:
            self.encoder.__dict__["max_ongoing_requests"] = ENCODER_ONGOING
        return self

    @property
    def encoder_app(self) -> str:
        return f"encoder-{_slug(self.name)}"

    @property
    def decoder_app(self) -> str:
        return f"decoder-{_slug(self.name)}"


class MeshConfig(CommonConfig):
    """Everything ``internvl-mesh serve`` needs."""

    models: list[ServedModel] = Field(min_length=1, max_length=32)
    preprocess: PreprocessConfig = Field(
        default_factory=PreprocessConfig, description="The preprocess pool (services.preprocess.config)."
    )
    preprocess_deployment: DeploymentConfig = Field(default_factory=_preprocess_pool)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    gateway_deployment: DeploymentConfig = Field(default_factory=_gateway_pool)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ServedModel]) -> list[ServedModel]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        slugs = [_slug(n) for n in names]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"model names collide once made into application names: {slugs}")
        return models


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c == "-" else "-" for c in name.lower()).strip("-")[:48] or "model"


def _gateway_args(g: GatewaySettings) -> dict[str, Any]:
    """The gateway's settings; ``ops`` and ``remote_images`` only where they differ from the defaults
    (kept out of the rendered config otherwise, so the chart's default render stays the same)."""
    out = g.model_dump(exclude={"ops", "remote_images"})
    for name in ("ops", "remote_images"):
        changed = getattr(g, name).model_dump(exclude_defaults=True)
        if changed:
            out[name] = changed
    return out


def _model_args(m: ServedModel) -> dict[str, Any]:
    return m.model_dump(include=set(ModelConfig.model_fields))


def decoder_options(m: ServedModel) -> dict[str, Any]:
    """The decoder's options: the prefix-affinity request router; with tensor parallelism, a placement
    group holding every rank's GPU.

    The engine spawns one process per rank from the replica, and those processes can only use GPUs the
    replica's actor can see, so the replica reserves all of them in one ``STRICT_PACK`` bundle (one node:
    NCCL over NVLink, not the network) rather than one bundle per rank.
    """
    options = m.decoder.serve_options()
    options["request_router_config"] = {
        "request_router_class": DECODER_ROUTER["request_router_class"],
        "request_router_kwargs": dict(DECODER_ROUTER["request_router_kwargs"]),
    }
    tp = m.tensor_parallel_size
    if tp > 1:
        actor = options["ray_actor_options"]
        cpus = max(m.decoder.num_cpus, 1.0) * tp
        bundle: dict[str, float] = {"CPU": cpus, **m.decoder.resources}
        if m.decoder.memory_gb:
            bundle["memory"] = int(m.decoder.memory_gb * 1024**3)
        actor["num_cpus"] = cpus
        if m.device != "cpu":
            bundle["GPU"] = float(tp)
            actor["num_gpus"] = float(tp)
        options["placement_group_bundles"] = [bundle]
        options["placement_group_strategy"] = "STRICT_PACK"
    return options


def _app(name: str, route: str | None, import_path: str, kind: type[StrictModel], args: dict[str, Any]):
    """One application of the Serve config. Its ``args`` are checked against the builder's typed model
    here, so ``config render`` fails where a replica would; settings appear as set (the defaults stay
    with the services), the shared sections in full (the chart renders the same)."""
    build(kind, args, f"the args of application {name}")
    return {"name": name, "route_prefix": route, "import_path": import_path, "args": args}


def _common(cfg: MeshConfig) -> dict[str, Any]:
    return {
        "redis": cfg.redis.model_dump(),
        "cache": cfg.cache.model_dump(),
        "grpc": cfg.grpc.model_dump(),
        "tracing": cfg.tracing.model_dump(),
    }


def _set(settings: BaseModel) -> dict[str, Any]:
    return settings.model_dump(mode="json", exclude_unset=True)


def _internal_route(cfg: MeshConfig, app: str) -> str | None:
    """No HTTP route for an internal application, unless Serve's own gRPC proxy is on (its router finds
    an application by name only among those with a route)."""
    return f"{INTERNAL_PREFIX}/{app}" if cfg.gateway.serve_grpc_port else None


def _model_apps(cfg: MeshConfig, m: ServedModel) -> list[dict[str, Any]]:
    encoder = {
        "model": _model_args(m),
        "settings": _set(m.encoder_settings),
        "common": _common(cfg),
        "preprocess_app": "preprocess",
        "deployment_options": m.encoder.serve_options(),
    }
    decoder = {
        "model": _model_args(m),
        "settings": _set(m.decoder_settings),
        "tensor_parallel_size": m.tensor_parallel_size,
        "common": _common(cfg),
        "deployment_options": decoder_options(m),
    }
    return [
        _app(m.encoder_app, _internal_route(cfg, m.encoder_app), ENCODER_BUILDER, EncoderAppArgs, encoder),
        _app(m.decoder_app, _internal_route(cfg, m.decoder_app), DECODER_BUILDER, DecoderAppArgs, decoder),
    ]


def _gateway_app(cfg: MeshConfig) -> dict[str, Any]:
    models = [
        {
            "name": m.name,
            "encoder_app": m.encoder_app,
            "decoder_app": m.decoder_app,
            "max_tiles_per_image": m.max_tiles_per_image,
        }
        for m in cfg.models
    ]
    args = {
        "gateway": _gateway_args(cfg.gateway),
        "models": models,
        "preprocess_app": "preprocess",
        "common": _common(cfg),
        "deployment_options": cfg.gateway_deployment.serve_options(),
    }
    return _app("gateway", "/", GATEWAY_BUILDER, GatewayAppArgs, args)


def render_serve_config(cfg: MeshConfig) -> dict[str, Any]:
    """The Serve config (the schema of ``serve deploy`` and KubeRay's ``serveConfigV2``): one application
    per service, each with its typed args (``PreprocessAppArgs``, ``EncoderAppArgs``, ``DecoderAppArgs``,
    ``GatewayAppArgs``) written out, which the application's builder validates again."""
    preprocess = {
        "config": _set(cfg.preprocess),
        "common": _common(cfg),
        "deployment_options": cfg.preprocess_deployment.serve_options(),
    }
    apps = [
        _app(
            "preprocess",
            _internal_route(cfg, "preprocess"),
            PREPROCESS_BUILDER,
            PreprocessAppArgs,
            preprocess,
        )
    ]
    for m in cfg.models:
        apps += _model_apps(cfg, m)
    apps.append(_gateway_app(cfg))
    out: dict[str, Any] = {
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.gateway.host, "port": cfg.gateway.http_port},
        "applications": apps,
    }
    if cfg.gateway.serve_grpc_port:
        out["grpc_options"] = {
            "port": cfg.gateway.serve_grpc_port,
            "grpc_servicer_functions": [
                "internvl.preprocess.v1.preprocess_pb2_grpc.add_PreprocessServiceServicer_to_server",
                "internvl.encoder.v1.encoder_pb2_grpc.add_EncoderServiceServicer_to_server",
                "internvl.decoder.v1.decoder_pb2_grpc.add_DecoderServiceServicer_to_server",
            ],
        }
    return out
