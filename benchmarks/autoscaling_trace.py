"""The encoder scaling on its own signal, traced on the multi-node test cluster.

Starts the cluster of tests/multinode (a head and vision / decoder nodes from the chart's worker
groups), deploys the Serve config ``internvl-mesh config render`` prints with the test's settings
(encoder 1..2 replicas on ``tiles_waiting``, target 3 a replica, a 0.5 s batching window, 4 s look-back,
upscale delay 1 s, downscale delay 5 s), then: ``--idle`` seconds quiet, ``--burst`` seconds of
``--clients`` clients sending new 1024 × 1024 images (10 tiles each), and quiet again until the encoder
is back to one replica (at most ``--tail`` seconds). Every half second it records the encoder's running
replicas and Serve's target; the controller's log gives the policy's decisions (the summed signal and
the replicas it asked for). Writes ``benchmarks/results/autoscaling.json`` and ``autoscaling.png``.

    python benchmarks/autoscaling_trace.py [--clients 6] [--burst 60] [--idle 30] [--tail 60]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.multinode.conftest import DEPLOYMENTS, NODES, render  # noqa: E402
from tests.multinode.test_1_placement import chat  # noqa: E402
from tests.support.images import png  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.ray_cluster import RayCluster  # noqa: E402
from tests.support.signing import ENV as MESH_SECRET_ENV  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DECISION = re.compile(
    r"^\w+ (\S+ \S+) controller \d+ -- Encoder: signals \{'tiles_waiting': ([\d.]+)\}.*: (\d+) replicas"
)


def encoder_state(cluster) -> tuple[int, int | None]:
    for name, app in cluster.serve_applications().items():
        if name.startswith("encoder-"):
            d = next(iter(app["deployments"].values()))
            running = sum(1 for r in d["replicas"] if r["state"] == "RUNNING")
            return running, d.get("target_num_replicas")
    return 0, None


def decisions(cluster, t0_wall: float) -> list[dict]:
    out = []
    for path in glob.glob(f"{cluster.temp_dir}/session_latest/logs/serve/controller_*.log"):
        for line in Path(path).read_text().splitlines():
            m = DECISION.match(line)
            if m:
                wall = time.mktime(time.strptime(m.group(1).split(",")[0], "%Y-%m-%d %H:%M:%S"))
                out.append(
                    {
                        "t": round(wall - t0_wall, 1),
                        "tiles_waiting": float(m.group(2)),
                        "wanted": int(m.group(3)),
                    }
                )
    return sorted(out, key=lambda d: d["t"])


def run(args) -> dict:
    from services.common.tiny_checkpoint import make_tiny_checkpoint

    os.environ.update(MESH_SECRET_ENV)
    work = Path(tempfile.mkdtemp(prefix="ivm-trace-"))
    ckpt = make_tiny_checkpoint(work / "tiny", preset="tiny", seed=0)
    cluster = RayCluster(NODES).start()
    try:
        port = free_port()
        redis_url = "redis://127.0.0.1:6379/12"
        config = render(ckpt, port, redis_url, f"trace{os.getpid()}", f"redis.url={redis_url}", *DEPLOYMENTS)
        config["proxy_location"] = "HeadOnly"
        cluster.serve_deploy(config)
        cluster.wait_running([a["name"] for a in config["applications"]])
        mesh = {"base": f"http://127.0.0.1:{port}", "model": "tiny-mn"}
        trace, done, stop = [], [], threading.Event()
        t0, t0_wall = time.monotonic(), time.time()

        def client(seed: int) -> None:
            while not stop.is_set():
                seed += 1
                r = chat(mesh, png(1024, 1024, seed=seed), timeout=60)
                done.append((round(time.monotonic() - t0, 1), r.status_code))

        def sample() -> tuple[int, int | None]:
            running, target = encoder_state(cluster)
            trace.append(
                {
                    "t": round(time.monotonic() - t0, 1),
                    "running": running,
                    "target": target,
                    "completed": len(done),
                }
            )
            return running, target

        while time.monotonic() - t0 < args.idle:
            sample()
            time.sleep(0.5)
        burst_start = round(time.monotonic() - t0, 1)
        clients = [threading.Thread(target=client, args=(100_000 * (i + 1),)) for i in range(args.clients)]
        for c in clients:
            c.start()
        while time.monotonic() - t0 < args.idle + args.burst:
            sample()
            time.sleep(0.5)
        stop.set()
        burst_end = round(time.monotonic() - t0, 1)
        tail_end = time.monotonic() + args.tail
        while time.monotonic() < tail_end:
            running, _ = sample()
            if running == 1 and time.monotonic() - t0 > burst_end + 10:
                break
            time.sleep(0.5)
        for c in clients:
            c.join(120)
        return {
            "burst": {
                "start_s": burst_start,
                "end_s": burst_end,
                "clients": args.clients,
                "image": "1024x1024 PNG, 10 tiles",
            },
            "config": [s for s in DEPLOYMENTS if "encoder" in s],
            "requests": {"completed": len(done), "statuses": sorted({s for _, s in done})},
            "trace": trace,
            "decisions": decisions(cluster, t0_wall),
        }
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    t = [p["t"] for p in report["trace"]]
    ax.step(t, [p["running"] for p in report["trace"]], where="post", label="encoder replicas running")
    targets = [p["target"] if p["target"] is not None else float("nan") for p in report["trace"]]
    ax.step(t, targets, where="post", linestyle="--", label="Serve's target replicas")
    ax.set_xlabel("seconds")
    ax.set_ylabel("replicas")
    ax.set_ylim(0, 3)
    ax.axvspan(report["burst"]["start_s"], report["burst"]["end_s"], alpha=0.15, label="burst")
    ax2 = ax.twinx()
    d = report["decisions"]
    ax2.plot(
        [x["t"] for x in d],
        [x["tiles_waiting"] for x in d],
        "o",
        color="tab:red",
        ms=3,
        label="tiles waiting (policy's sum)",
    )
    ax2.set_ylabel("tiles waiting")
    fig.legend(loc="lower left", bbox_to_anchor=(0.08, 0.12), fontsize=8)
    ax.set_title("Encoder autoscaling on tiles waiting (1..2 replicas, target 3 a replica)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--burst", type=float, default=60)
    parser.add_argument("--idle", type=float, default=30)
    parser.add_argument("--tail", type=float, default=60)
    args = parser.parse_args()
    report = {"benchmark": "autoscaling", **run(args)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "autoscaling.json").write_text(json.dumps(report, indent=1) + "\n")
    plot(report, RESULTS / "autoscaling.png")
    ups = [p["t"] for p in report["trace"] if p["running"] == 2]
    print(
        json.dumps(
            {
                "first_two_replicas_s": ups[0] if ups else None,
                "burst": report["burst"],
                "requests": report["requests"],
            }
        )
    )


if __name__ == "__main__":
    main()
