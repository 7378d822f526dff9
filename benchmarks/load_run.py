"""Sustained load on the OpenAI HTTP API of the whole mesh: failures, 429s, latency and memory.

The fixed shape: ``--clients`` concurrent streaming clients (64) for ``--duration`` seconds (120)
against the tiny checkpoint, each request one of 16 distinct images (1 to 13 tiles, drawn with
repeats, so the embedding cache sees hits) plus a question, ``max_tokens`` 32. The mesh is started
here on a local Ray (Serve's HTTP proxy on a free loopback port), deployed from the same rendered
Serve config ``internvl-mesh serve`` uses with the topology's default service settings, and stopped
at the end. Every deployment runs one replica (``--autoscale`` keeps the topology's autoscaling):
on a machine with two cores more replicas are only more processes competing for the same cores,
and a replica started during the measured minute would read as memory growth.

Reported: requests completed; failures by type (5xx, other 4xx, transport error, truncated stream,
timeout), 429s separately; TTFT and latency percentiles; the embedding-cache hit ratio (from the
gateway's Prometheus counters, before and after); the summed RSS of every mesh process (all of
Ray's processes: they are this driver's descendants) every 5 s, and its growth over the second
minute. Targets: zero failures, zero 429s, RSS growth under 10 %.

    python benchmarks/load_run.py --clients 64 --duration 120 [--quick] [--out FILE]

``--quick`` is 16 clients for 20 s. ``run_load`` is what ``tests/reliability/test_load_short.py``
drives against the test session's Ray.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import re
import socket
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODEL = "tiny-load"
ONE_REPLICA = {"autoscaling": {"min_replicas": 1, "max_replicas": 1}, "num_cpus": 0.5}
# (width, height): tile counts 1, 3..13 (grid + thumbnail, max_num 12), some counts twice.
IMAGE_SIZES = [
    (448, 448), (320, 240), (896, 448), (448, 896), (1344, 448), (896, 896), (1120, 896),
    (2240, 448), (1344, 896), (3136, 448), (1792, 896), (1344, 1344), (1792, 1120), (4480, 448),
    (1792, 1344), (1344, 1792),
]  # fmt: skip
SAMPLE_EVERY_S = 5.0
REQUEST_TIMEOUT_S = 120.0
QUESTIONS = ["What is in the picture?", "Describe the image.", "Name one colour you see.", "Count things."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_images(seed: int = 0) -> list[tuple[bytes, int]]:
    """16 distinct PNGs and their tile counts (max_num 12), 1 to 13 tiles."""
    import numpy as np
    from PIL import Image

    from services.common.types import TilingParams
    from services.preprocess.tiling import count_tiles

    out = []
    for k, (w, h) in enumerate(IMAGE_SIZES):
        rng = np.random.default_rng(seed + k)
        small = rng.integers(0, 255, size=(max(h // 32, 1), max(w // 32, 1), 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, format="PNG")
        out.append((buf.getvalue(), count_tiles(w, h, TilingParams(max_num=12))))
    tiles = [t for _, t in out]
    assert min(tiles) == 1 and max(tiles) == 13, tiles
    return out


# -- the load ---------------------------------------------------------------------------------------


@dataclass
class Results:
    started: float = 0.0
    completed: int = 0
    rate_limited: int = 0
    failures: Counter = field(default_factory=Counter)
    failure_examples: dict[str, str] = field(default_factory=dict)
    ttft_s: list[float] = field(default_factory=list)
    latency_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    rss_samples: list[tuple[float, int]] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        self.failure_examples.setdefault(kind, detail[:300])


def _body(image: bytes, question: str, max_tokens: int) -> dict[str, Any]:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return {
        "model": MODEL,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": question},
                ],
            }
        ],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def _one_request(client, url: str, body: dict[str, Any], results: Results) -> None:
    import httpx

    start = time.monotonic()
    ttft = None
    done = finished = False
    usage = None
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async with client.stream("POST", url, json=body) as r:
                if r.status_code != 200:
                    text = (await r.aread()).decode(errors="replace")
                    if r.status_code == 429:
                        results.rate_limited += 1
                    elif r.status_code >= 500:
                        results.fail("5xx", f"{r.status_code} {text}")
                    else:
                        results.fail("4xx", f"{r.status_code} {text}")
                    return
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if ttft is None:
                        ttft = time.monotonic() - start
                    if data == "[DONE]":
                        done = True
                        break
                    try:
                        event = json.loads(data)
                    except ValueError:
                        results.fail("malformed", f"an event that is not JSON: {data[:200]!r}")
                        return
                    if "error" in event:
                        results.fail("truncated", f"error event: {event['error']}")
                        return
                    for choice in event.get("choices") or ():
                        finished = finished or choice.get("finish_reason") is not None
                    usage = event.get("usage") or usage
    except TimeoutError:
        results.fail("timeout", f"no answer within {REQUEST_TIMEOUT_S} s")
        return
    except httpx.TransportError as exc:
        results.fail("transport", repr(exc))
        return
    if not (done and finished and usage):
        results.fail("truncated", f"done={done} finish_reason={finished} usage={usage}")
        return
    results.completed += 1
    results.ttft_s.append(ttft)
    results.latency_s.append(time.monotonic() - start)
    results.completion_tokens += usage.get("completion_tokens", 0)


async def _client(k, url, images, end, max_tokens, results: Results, seed: int) -> None:
    import httpx

    rng = random.Random(seed * 1000 + k)
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(REQUEST_TIMEOUT_S), limits=limits) as client:
        while time.monotonic() < end:
            image, _ = rng.choice(images)
            await _one_request(client, url, _body(image, rng.choice(QUESTIONS), max_tokens), results)


def mesh_rss_bytes(root_pid: int | None = None) -> tuple[int, int]:
    """Summed RSS of ``root_pid``'s descendants (Ray's processes when this process started Ray), and
    how many there are. The root itself (the load driver) is left out."""
    import psutil

    total = count = 0
    for p in psutil.Process(root_pid or os.getpid()).children(recursive=True):
        try:
            total += p.memory_info().rss
            count += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total, count


async def _sample_rss(results: Results, end: float, rss) -> None:
    while True:
        total, _ = await asyncio.to_thread(rss)
        results.rss_samples.append((round(time.monotonic() - results.started, 1), total))
        if time.monotonic() >= end:
            return
        await asyncio.sleep(min(SAMPLE_EVERY_S, max(0.0, end - time.monotonic())))


async def run_load(
    base_url: str,
    *,
    clients: int,
    duration_s: float,
    max_tokens: int = 32,
    images: list[tuple[bytes, int]] | None = None,
    rss=None,
    seed: int = 0,
) -> Results:
    """``clients`` streaming clients against ``base_url`` (``http://host:port/v1``) for ``duration_s``;
    requests in flight at the end finish (within their timeout) and count."""
    images = images or make_images(seed)
    results = Results(started=time.monotonic())
    end = results.started + duration_s
    url = base_url.rstrip("/") + "/chat/completions"
    tasks = [_client(k, url, images, end, max_tokens, results, seed) for k in range(clients)]
    if rss is not None:
        tasks.append(_sample_rss(results, end, rss))
    await asyncio.gather(*tasks)
    if rss is not None:
        results.rss_samples.append(
            (round(time.monotonic() - results.started, 1), (await asyncio.to_thread(rss))[0])
        )
    return results


# -- reporting --------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {
        "p50": round(qs[49], 4),
        "p90": round(qs[89], 4),
        "p99": round(qs[98], 4),
        "max": round(max(values), 4),
    }


def rss_growth(samples: list[tuple[float, int]], duration_s: float) -> dict[str, Any]:
    """Growth over the second minute (over the second half for runs shorter than two minutes)."""
    if len(samples) < 2:
        return {"from_s": None, "to_s": None, "growth_ratio": None}
    start_at = 60.0 if duration_s >= 120 else duration_s / 2
    first = min(samples, key=lambda s: abs(s[0] - start_at))
    last = samples[-1]
    return {
        "from_s": first[0],
        "to_s": last[0],
        "from_mib": round(first[1] / 2**20, 1),
        "to_mib": round(last[1] / 2**20, 1),
        "growth_ratio": round((last[1] - first[1]) / first[1], 4) if first[1] else None,
    }


def cache_counters(metrics_text: str) -> tuple[float, float]:
    def total(name: str) -> float:
        pattern = rf"^{name}_total(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$"
        return sum(float(v) for v in re.findall(pattern, metrics_text, flags=re.M))

    return total("internvl_mesh_embedding_cache_hits"), total("internvl_mesh_embedding_cache_misses")


def report(results: Results, *, clients: int, duration_s: float, cache: dict[str, Any]) -> dict[str, Any]:
    return {
        "clients": clients,
        "duration_s": duration_s,
        "requests_completed": results.completed,
        "requests_per_s": round(results.completed / duration_s, 2),
        "completion_tokens": results.completion_tokens,
        "failures": {
            k: results.failures.get(k, 0) for k in ("5xx", "4xx", "transport", "truncated", "timeout")
        },
        "failure_examples": results.failure_examples,
        "rate_limited_429": results.rate_limited,
        "ttft_s": percentiles(results.ttft_s),
        "latency_s": percentiles(results.latency_s),
        "embedding_cache": cache,
        "rss_samples": [{"t_s": t, "mib": round(b / 2**20, 1)} for t, b in results.rss_samples],
        "rss_growth_second_minute": rss_growth(results.rss_samples, duration_s),
    }


# -- the mesh ---------------------------------------------------------------------------------------


def mesh_config(checkpoint: str, http_port: int, metrics_port: int = 0, *, autoscale: bool):
    from mesh.topology import MeshConfig
    from services.common.config import build

    pools = {} if autoscale else {"encoder": ONE_REPLICA, "decoder": ONE_REPLICA}
    doc: dict[str, Any] = {
        "models": [{"name": MODEL, "path": checkpoint, "dtype": "float32", "device": "cpu", **pools}],
        "gateway": {"http_port": http_port, "grpc_port": 0, "metrics_port": metrics_port},
    }
    if not autoscale:
        doc["preprocess_deployment"] = ONE_REPLICA
        doc["gateway_deployment"] = ONE_REPLICA
    return build(MeshConfig, doc, "load_run")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="16 clients for 20 s")
    parser.add_argument("--autoscale", action="store_true", help="keep the topology's autoscaling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="", help="write the JSON report here")
    args = parser.parse_args(argv)
    if args.quick:
        args.clients, args.duration = 16, 20.0
    if not (1 <= args.clients <= 1024 and 1 <= args.duration <= 3600):
        parser.error("--clients must be in 1..1024 and --duration in 1..3600")

    import tempfile

    import httpx
    import ray
    from ray import serve

    from mesh.serve import deploy, start_ray
    from mesh.topology import render_serve_config
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    log = lambda msg: print(f"[load_run] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    checkpoint = make_tiny_checkpoint(Path(tempfile.mkdtemp(prefix="ivm-load-")) / "tiny", preset="tiny")
    http_port, metrics_port = free_port(), free_port()
    cfg = mesh_config(str(checkpoint), http_port, metrics_port, autoscale=args.autoscale)
    serve_config = render_serve_config(cfg)
    t0 = time.monotonic()
    start_ray(cfg, num_cpus=8, num_gpus=0)
    try:
        deploy(serve_config)
        log(
            f"mesh deployed in {time.monotonic() - t0:.1f} s; {args.clients} clients for {args.duration:.0f} s"
        )
        base, metrics = f"http://127.0.0.1:{http_port}", f"http://127.0.0.1:{metrics_port}/metrics"
        images = make_images(args.seed)
        before = cache_counters(httpx.get(metrics, timeout=30).text)
        results = asyncio.run(
            run_load(
                base + "/v1",
                clients=args.clients,
                duration_s=args.duration,
                max_tokens=args.max_tokens,
                images=images,
                rss=mesh_rss_bytes,
                seed=args.seed,
            )
        )
        after = cache_counters(httpx.get(metrics, timeout=30).text)
        hits, misses = after[0] - before[0], after[1] - before[1]
        cache = {
            "hits": hits,
            "misses": misses,
            "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
            "source": "gateway metrics internvl_mesh_embedding_cache_{hits,misses}_total",
        }
        out = report(results, clients=args.clients, duration_s=args.duration, cache=cache)
        out["setup"] = {
            "checkpoint": "tiny preset (services.common.tiny_checkpoint), float32, CPU",
            "max_tokens": args.max_tokens,
            "images": [{"size": list(s), "tiles": t} for s, (_, t) in zip(IMAGE_SIZES, images)],
            "replicas": "topology autoscaling" if args.autoscale else "1 per deployment, num_cpus 0.5",
            "ray_num_cpus": 8,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "mesh_processes": mesh_rss_bytes()[1],
        }
    finally:
        serve.shutdown()
        ray.shutdown()
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    ok = not sum(out["failures"].values()) and not out["rate_limited_429"]
    growth = out["rss_growth_second_minute"]["growth_ratio"]
    log(f"{'PASS' if ok else 'FAIL'}: {out['requests_completed']} completed, failures {out['failures']}, "
        f"429s {out['rate_limited_429']}, RSS growth {growth}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
