"""Prefix-affinity routing to decoder replicas: the KV prefix hit rate on a repeated-image workload.

Three deployments of the same mesh (tiny checkpoint, fp32 on CPU, a local Ray), one after the other,
each with cold decoder caches:

- ``one_replica``: one decoder replica (the ceiling: every repeat can hit);
- ``prefix_affinity``: two decoder replicas, our router (services/decoder/routing.py), as rendered;
- ``default_router``: two decoder replicas, the rendered config without ``request_router_config``
  (Serve's power of two choices by load).

Workload: ``--images`` distinct images, each asked ``--rounds`` times with a different question,
rounds in shuffled order, ``--concurrency`` clients. The hit rate is the share of prompt tokens that
were served from the prefix cache (``usage.prompt_tokens_details.cached_tokens`` / ``prompt_tokens``),
over every request; the first round of an image cannot hit, so the ceiling is (rounds − 1) / rounds of
each image's shared prefix.

    python benchmarks/routing_bench.py [--images 12] [--rounds 3] [--concurrency 4]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "tiny-routing"
ONE = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}, "num_cpus": 0.5}
TWO = {"autoscaling": {"min_replicas": 2, "max_replicas": 2}, "num_cpus": 0.5}


def png(width: int, height: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def serve_config(ckpt: Path, http_port: int, replicas: dict, router: bool) -> dict[str, Any]:
    from mesh.topology import MeshConfig, render_serve_config
    from services.common.config import build

    data = {
        "models": [
            {
                "name": MODEL,
                "path": str(ckpt),
                "dtype": "float32",
                "device": "cpu",
                "encoder": ONE,
                "decoder": replicas,
            }
        ],
        "preprocess_deployment": ONE,
        "gateway_deployment": ONE,
        "gateway": {"http_port": http_port, "grpc_port": 0, "metrics_port": 0},
    }
    config = render_serve_config(build(MeshConfig, data, "routing_bench"))
    if not router:
        for app in config["applications"]:
            app["args"]["deployment_options"].pop("request_router_config", None)
    return config


def ask(base: str, image: bytes, question: str) -> dict[str, Any]:
    import httpx

    uri = "data:image/png;base64," + base64.b64encode(image).decode()
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": "Answer in one word."},
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": question},
                ],
            },
        ],
    }
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=300)
    r.raise_for_status()
    usage = r.json()["usage"]
    return {"prompt": usage["prompt_tokens"], "cached": usage["prompt_tokens_details"]["cached_tokens"]}


def workload(images: list[bytes], rounds: int, concurrency: int, base: str, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    results: list[dict[str, Any]] = []
    t = time.perf_counter()
    for r in range(rounds):
        order = list(range(len(images)))
        rng.shuffle(order)
        with ThreadPoolExecutor(concurrency) as pool:
            results += pool.map(lambda i, r=r: ask(base, images[i], f"Question {r} about image {i}?"), order)
    prompt = sum(x["prompt"] for x in results)
    cached = sum(x["cached"] for x in results)
    repeats = results[len(images) :]
    return {
        "requests": len(results),
        "hit_rate": round(cached / prompt, 4),
        "repeats_with_a_hit": round(sum(1 for x in repeats if x["cached"] > 0) / max(1, len(repeats)), 4),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "wall_s": round(time.perf_counter() - t, 1),
    }


def run_variant(name: str, config: dict[str, Any], args, images: list[bytes], base: str) -> dict[str, Any]:
    from ray import serve

    from mesh.serve import deploy

    t = time.perf_counter()
    deploy(config)
    deploy_s = round(time.perf_counter() - t, 1)
    try:
        out = workload(images, args.rounds, args.concurrency, base, args.seed)
    finally:
        for app in reversed(config["applications"]):
            serve.delete(app["name"])
    print(f"{name}: {out}", flush=True)
    return {**out, "deploy_s": deploy_s}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "routing.json")
    args = parser.parse_args()
    for key, value in {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_enable_worker_prestart": "0",
        "RAY_AUTH_MODE": "disabled",
    }.items():
        os.environ.setdefault(key, value)
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    from mesh.serve import _mesh_secret
    from services.common.tiny_checkpoint import make_tiny_checkpoint
    from tests.support.ports import free_port

    _mesh_secret(None)
    work = Path(tempfile.mkdtemp(prefix="ivm-routing-"))
    ckpt = make_tiny_checkpoint(work / "tiny", preset="tiny", seed=0)
    temp_dir = tempfile.mkdtemp(prefix="ivm-bench-ray-", dir="/tmp")
    ray.init(
        num_cpus=8,
        num_gpus=0,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="warning",
        log_to_driver=False,
    )
    http_port = free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=http_port))
    base = f"http://127.0.0.1:{http_port}"
    images = [png(448 + 16 * i, 448, seed=i) for i in range(args.images)]
    variants = {
        "one_replica": serve_config(ckpt, http_port, ONE, router=True),
        "prefix_affinity": serve_config(ckpt, http_port, TWO, router=True),
        "default_router": serve_config(ckpt, http_port, TWO, router=False),
    }
    try:
        results = {name: run_variant(name, cfg, args, images, base) for name, cfg in variants.items()}
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)
    one = results["one_replica"]["hit_rate"]
    report = {
        "benchmark": "routing",
        "workload": {
            "images": args.images,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "max_tokens": 2,
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
        "results": results,
        "prefix_affinity_over_one_replica": round(results["prefix_affinity"]["hit_rate"] / one, 3),
        "default_router_over_one_replica": round(results["default_router"]["hit_rate"] / one, 3),
        "target": "prefix_affinity hit rate >= 0.9 x one_replica",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
