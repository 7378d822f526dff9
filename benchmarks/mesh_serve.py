"""The mesh under benchmark: the whole mesh on a local Ray Serve, called over the OpenAI HTTP API
(``http``) and through the applications' DeploymentHandles (``handles``, ``handles_cached``,
``noop_round_trips``). ``benchmarks/mesh_bench.py`` runs it against the peers of
``benchmarks/mesh_peers.py``.
"""

from __future__ import annotations

import base64
import os
import socket
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from benchmarks.mesh_peers import KV_CACHE, MAX_NUM, MAX_TOKENS, decode_request, ms
from services.common.types import TilingParams

MODEL = "small-mesh"
RAY_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0",
}
DEPLOYMENT = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}, "num_cpus": 0.5}


def med(values: list[float]) -> float:
    return round(statistics.median(values), 1) if values else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat_messages(question: str, data: bytes) -> list[dict[str, Any]]:
    """OpenAI messages: the question first, then the image (a different question = no prefix hit)."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": question},
                {"type": "image_url", "image_url": {"url": data_uri(data)}},
            ],
        }
    ]


# -- the mesh on Ray Serve ------------------------------------------------------------------------
class Mesh:
    def __init__(self, ckpt: Path, threads: int):
        for key, value in RAY_ENV.items():
            os.environ.setdefault(key, value)
        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions

        from mesh.serve import deploy
        from mesh.topology import MeshConfig, render_serve_config
        from services.common.config import build

        self.temp_dir = tempfile.mkdtemp(prefix="ivm-bench-ray-", dir="/tmp")
        env = {"RAY_AUTH_MODE": "disabled", "OMP_NUM_THREADS": str(threads)}
        ray.init(
            num_cpus=8,
            num_gpus=0,
            include_dashboard=False,
            _temp_dir=self.temp_dir,
            logging_level="warning",
            log_to_driver=False,
            runtime_env={"env_vars": env},
        )
        self.http_port = free_port()
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=self.http_port))
        cfg = build(
            MeshConfig,
            {
                "models": [
                    {
                        "name": MODEL,
                        "path": str(ckpt),
                        "dtype": "float32",
                        "device": "cpu",
                        "encoder": DEPLOYMENT,
                        "decoder": DEPLOYMENT,
                        "decoder_settings": {"cache": KV_CACHE},
                    }
                ],
                "preprocess_deployment": DEPLOYMENT,
                "gateway_deployment": DEPLOYMENT,
                "gateway": {"http_port": self.http_port, "grpc_port": 0, "metrics_port": 0},
            },
            "mesh_bench",
        )
        self.serve_config = render_serve_config(cfg)
        t = time.perf_counter()
        deploy(self.serve_config)
        self.deploy_s = round(time.perf_counter() - t, 1)
        model = cfg.models[0]
        self.preprocess = serve.get_app_handle("preprocess")
        self.encoder = serve.get_app_handle(model.encoder_app)
        self.decoder = serve.get_app_handle(model.decoder_app)
        self.replica_threads = ray.get(ray.remote(num_cpus=0.5)(lambda: torch.get_num_threads()).remote())
        import openai

        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.http_port}/v1", api_key="unused", max_retries=0, timeout=600
        )

    # HTTP through Serve's proxy and the gateway
    def http(self, question: str, data: bytes, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        t0 = time.perf_counter()
        first, text, usage = None, "", None
        stream = self.client.chat.completions.create(
            model=MODEL,
            messages=chat_messages(question, data),
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            first = first or time.perf_counter()  # the gateway answers once the first token exists
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if chunk.usage is not None:
                usage = chunk.usage
        t1 = time.perf_counter()
        return {
            "ttft_ms": ms(first - t0),
            "total_ms": ms(t1 - t0),
            "completion_tokens": usage.completion_tokens if usage else None,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "text": text,
        }

    # the same request through the applications' handles from this process (no proxy, no gateway)
    def handles(self, question: str, data: bytes, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        from services.common.context import RequestContext

        params = TilingParams(max_num=MAX_NUM)
        ctx = _signed(
            RequestContext(
                request_id=f"hop-{uuid.uuid4().hex[:12]}",
                cache_namespace="default",
                deadline=time.time() + 600,
            )
        )
        t0 = time.perf_counter()
        self.preprocess.tile.remote([(data, params)], ctx).result()  # timed alone; it caches nothing
        t1 = time.perf_counter()
        refs = self.encoder.embed.remote([(data, params)], ctx).result()
        t2 = time.perf_counter()
        first, tokens = None, 0
        for event in self.decoder.options(stream=True).generate.remote(
            decode_request(question, max_tokens), refs, ctx
        ):
            first = first or time.perf_counter()
            tokens += len(event.token_ids)
        t3 = time.perf_counter()
        import ray

        fetch = float("nan")
        if refs[0].object_ref is not None:
            tf = time.perf_counter()
            ray.get(refs[0].object_ref)
            fetch = ms(time.perf_counter() - tf)
        return {
            "preprocess_ms": ms(t1 - t0),
            "embed_ms": ms(t2 - t1),
            "decode_ttft_ms": ms(first - t2),
            "decode_total_ms": ms(t3 - t2),
            "ttft_ms": ms(first - t1),
            "total_ms": ms(t3 - t1),
            "completion_tokens": tokens,
            "ref_kind": refs[0].kind,
            "embedding_fetch_ms": fetch,
        }

    def handles_cached(self, question: str, data: bytes, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        """The same image and question again through the handles: embedding hit + KV prefix hit."""
        from services.common.context import RequestContext

        ctx = _signed(
            RequestContext(
                request_id=f"hop-{uuid.uuid4().hex[:12]}",
                cache_namespace="default",
                deadline=time.time() + 600,
            )
        )
        t0 = time.perf_counter()
        refs = self.encoder.embed.remote([(data, TilingParams(max_num=MAX_NUM))], ctx).result()
        t1 = time.perf_counter()
        first = None
        for _event in self.decoder.options(stream=True).generate.remote(
            decode_request(question, max_tokens), refs, ctx
        ):
            first = first or time.perf_counter()
        t2 = time.perf_counter()
        return {
            "embed_ms": ms(t1 - t0),
            "decode_ttft_ms": ms(first - t1),
            "ttft_ms": ms(first - t0),
            "total_ms": ms(t2 - t0),
            "embedding_hit": refs[0].cache_hit,
        }

    def noop_round_trips(self, n: int) -> dict[str, float]:
        def timed(fn) -> float:
            samples = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                samples.append(ms(time.perf_counter() - t))
            return med(samples)

        return {
            "preprocess_handle_ms": timed(lambda: self.preprocess.check_health.remote().result()),
            "encoder_handle_ms": timed(lambda: self.encoder.stats.remote().result()),
            "decoder_handle_ms": timed(lambda: self.decoder.info.remote().result()),
            "http_models_list_ms": timed(lambda: self.client.models.list()),
        }

    def close(self) -> None:
        import ray
        from ray import serve

        for app in reversed(self.serve_config["applications"]):
            serve.delete(app["name"])
        serve.shutdown()
        ray.shutdown()


def _signed(ctx):
    """The context signed with the mesh secret the replicas were started with (the gateway's job; this
    benchmark calls the handles directly, as the gateway does)."""
    from services.common.serve_args import mesh_signer

    return mesh_signer("benchmark").sign(ctx)
