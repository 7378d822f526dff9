"""Fair share between tenants on the whole mesh (Ray Serve, small tiny-checkpoint preset, fp32 on CPU).

One run, one mesh, two copies of one checkpoint: model ``fair`` (the default, fair share on in the
decoder and the encoder) and model ``fifo`` (fair share off: priority, then arrival). Two tenants with
their own keys. Per model, in turn:

- B alone: ``--alone`` short requests (TTFT of one request on an idle mesh);
- the flood: tenant A keeps ``3 x max_num_seqs`` long-prompt requests in flight (so requests queue in
  the decoder) for ``--seconds``, while tenant B sends one short request every two seconds.

Measured: B's TTFT (streamed, the first content chunk) alone and under the flood, A's completion
tokens per second, the decoder's preemptions (its ``info()``), and B's greedy answers (the same on
both models: fair share changes the order of work, never the tokens). Where the decoder's ``info()``
carries the scheduler's per-tenant counters (``tenants``), the admissions of A ahead of B's waiting
requests are reported from them.

    .venv/bin/python -m benchmarks.fairness_bench [--seconds 40] [--out benchmarks/results/fairness.json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

from benchmarks.mesh_serve import DEPLOYMENT, RAY_ENV, free_port
from services.common.tiny_checkpoint import make_tiny_checkpoint

MAX_NUM_SEQS = 8
KV_CACHE = {"num_blocks": 1280}
LONG_PROMPT = " ".join(f"word{i % 97}" for i in range(400))  # tenant A: long prompts
A_MAX_TOKENS = 24
B_MAX_TOKENS = 4


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def tenants_file(path: Path) -> dict[str, str]:
    """Tenants A and B (weight 1, priority 0, generous limits) and one key each: tenant -> key."""
    from gateway.tenancy.keys import create_key

    limits = {"requests_per_s": 1000, "burst": 1000, "max_concurrent": 1000, "tokens_per_min": 10_000_000}
    keys, entries = {}, []
    for tenant in ("A", "B"):
        plain, entry = create_key(tenant)
        keys[tenant] = plain
        entries.append(entry.model_dump(mode="json"))
    data = {
        "tenants": [{"name": t, "allowed_models": ["*"], "limits": limits} for t in ("A", "B")],
        "keys": entries,
    }
    path.write_text(yaml.safe_dump(data))
    return keys


def model_entry(name: str, ckpt: Path, fair: bool) -> dict[str, Any]:
    return {
        "name": name,
        "path": str(ckpt),
        "dtype": "float32",
        "device": "cpu",
        "encoder": DEPLOYMENT,
        "decoder": DEPLOYMENT,
        "encoder_settings": {"batching": {"fair_share": fair}},
        "decoder_settings": {
            "cache": KV_CACHE,
            "scheduler": {"max_num_seqs": MAX_NUM_SEQS, "fair_share": fair},
        },
    }


def start_mesh(ckpt: Path, tenants: Path) -> tuple[int, dict[str, Any]]:
    for key, value in RAY_ENV.items():
        os.environ.setdefault(key, value)
    from services.common.context import MESH_SECRET_ENV

    os.environ.setdefault(MESH_SECRET_ENV, secrets.token_hex(32))  # the gateway signs, services verify
    import ray
    from ray import serve
    from ray.serve.config import HTTPOptions

    from mesh.serve import deploy
    from mesh.topology import MeshConfig, render_serve_config
    from services.common.config import build

    temp_dir = tempfile.mkdtemp(prefix="ivm-fair-ray-", dir="/tmp")
    ray.init(
        num_cpus=8,
        num_gpus=0,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="warning",
        log_to_driver=False,
        runtime_env={
            "env_vars": {
                "RAY_AUTH_MODE": "disabled",
                "OMP_NUM_THREADS": "1",
                MESH_SECRET_ENV: os.environ[MESH_SECRET_ENV],
            }
        },
    )
    port = free_port()
    serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
    cfg = build(
        MeshConfig,
        {
            "models": [model_entry("fair", ckpt, True), model_entry("fifo", ckpt, False)],
            "preprocess_deployment": DEPLOYMENT,
            "gateway_deployment": DEPLOYMENT,
            "gateway": {
                "http_port": port,
                "grpc_port": 0,
                "metrics_port": 0,
                "tenants_file": str(tenants),
            },
            "redis": {"key_prefix": f"ivm-fair-{uuid.uuid4().hex[:8]}"},
        },
        "fairness_bench",
    )
    deploy(render_serve_config(cfg))
    handles = {m.name: serve.get_app_handle(m.decoder_app) for m in cfg.models}
    return port, handles


class Client:
    def __init__(self, port: int, keys: dict[str, str]):
        self.base = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.keys = keys

    def chat(self, model: str, tenant: str, prompt: str, max_tokens: int) -> dict[str, Any]:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"}
        t0 = time.perf_counter()
        first, text, tokens = None, "", 0
        with httpx.stream("POST", self.base, json=body, headers=headers, timeout=600) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{tenant} got {r.status_code}: {r.read()[:300]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        first = first or time.perf_counter()
                        text += choice["delta"]["content"]
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        end = time.perf_counter()
        return {"ttft_s": (first or end) - t0, "e2e_s": end - t0, "text": text, "tokens": tokens}


def flood(client: Client, model: str, seconds: float) -> dict[str, Any]:
    """A keeps 3 x max_num_seqs requests in flight; B sends one short request every two seconds."""
    stop = time.monotonic() + seconds
    a_tokens, a_done, lock = [0], [0], threading.Lock()

    def tenant_a(k: int) -> None:
        n = 0
        while time.monotonic() < stop:
            out = client.chat(model, "A", f"{k}-{n} {LONG_PROMPT}", A_MAX_TOKENS)
            n += 1
            with lock:
                a_tokens[0] += out["tokens"]
                a_done[0] += 1

    threads = [threading.Thread(target=tenant_a, args=(k,), daemon=True) for k in range(3 * MAX_NUM_SEQS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    time.sleep(min(5.0, seconds / 4))  # the flood fills the batch and the queue first
    b = []
    while time.monotonic() < stop:
        tick = time.monotonic()
        b.append(client.chat(model, "B", "Say hello.", B_MAX_TOKENS))
        time.sleep(max(0.0, 2.0 - (time.monotonic() - tick)))
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return {
        "b_ttft_s": [round(x["ttft_s"], 3) for x in b],
        "b_texts": [x["text"] for x in b],
        "a_requests": a_done[0],
        "a_tokens_per_s": round(a_tokens[0] / elapsed, 2),
    }


def run_model(client: Client, handle, model: str, seconds: float, alone: int) -> dict[str, Any]:
    solo = [client.chat(model, "B", "Say hello.", B_MAX_TOKENS) for _ in range(alone)]
    before = handle.info.remote().result()
    under = flood(client, model, seconds)
    after = handle.info.remote().result()
    out = {
        "b_alone_ttft_s": [round(x["ttft_s"], 3) for x in solo],
        "b_alone_texts": [x["text"] for x in solo],
        **under,
        "b_ttft_p50_s": round(statistics.median(under["b_ttft_s"]), 3) if under["b_ttft_s"] else None,
        "b_ttft_p95_s": round(pct(under["b_ttft_s"], 95), 3),
        "preemptions": after.get("preemptions", 0) - before.get("preemptions", 0),
    }
    tenants = after.get("tenants")
    if tenants:
        out["engine_tenants"] = tenants
        out["a_admitted_ahead_of_waiting_b"] = (tenants.get("B") or {}).get("passed_over")
    return out


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for model, color in (("fair", "tab:green"), ("fifo", "tab:red")):
        r = results["models"][model]
        ax1.plot(
            r["b_ttft_s"], marker="o", color=color, label=f"fair share {'on' if model == 'fair' else 'off'}"
        )
    ax1.set_xlabel("tenant B's request (one every 2 s)")
    ax1.set_ylabel("B's time to first token (s)")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.set_title("B under A's flood")
    labels = ["B TTFT p95 (s)", "A tokens/s"]
    on, off = results["models"]["fair"], results["models"]["fifo"]
    xs = range(len(labels))
    ax2.bar(
        [x - 0.2 for x in xs], [on["b_ttft_p95_s"], on["a_tokens_per_s"]], 0.4, label="on", color="tab:green"
    )
    ax2.bar(
        [x + 0.2 for x in xs], [off["b_ttft_p95_s"], off["a_tokens_per_s"]], 0.4, label="off", color="tab:red"
    )
    ax2.set_xticks(list(xs), labels)
    ax2.legend()
    fig.suptitle(f"Fair share between tenants - small preset, CPU, max_num_seqs {MAX_NUM_SEQS}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--alone", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/fairness.json"))
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="ivm-fair-"))
    ckpt = make_tiny_checkpoint(tmp / "small", preset="small", seed=0)
    keys = tenants_file(tmp / "tenants.yaml")
    port, handles = start_mesh(ckpt, tmp / "tenants.yaml")
    client = Client(port, keys)
    client.chat("fair", "A", "warm up", 2)
    client.chat("fifo", "A", "warm up", 2)
    models = {m: run_model(client, handles[m], m, args.seconds, args.alone) for m in ("fair", "fifo")}
    on, off = models["fair"], models["fifo"]
    results = {
        "preset": "small",
        "device": f"cpu ({os.cpu_count()} cores, shared)",
        "max_num_seqs": MAX_NUM_SEQS,
        "a_in_flight": 3 * MAX_NUM_SEQS,
        "seconds": args.seconds,
        "models": models,
        "b_ttft_p95_on_over_off": round(on["b_ttft_p95_s"] / off["b_ttft_p95_s"], 3),
        "a_throughput_on_over_off": round(on["a_tokens_per_s"] / off["a_tokens_per_s"], 3),
        "greedy_identical": on["b_texts"][:1] == off["b_texts"][:1]
        and on["b_alone_texts"] == off["b_alone_texts"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in results.items() if k != "models"}, indent=2))
    return results


if __name__ == "__main__":
    main()
