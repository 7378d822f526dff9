"""A multi-node Ray cluster on this machine: a head and worker nodes started with ``ray start`` (each its
own raylet and object store), each advertising the custom resources of one pool as the Helm chart's
worker groups do (``workerGroups.<group>.rayResources`` of the chart's values, named by mesh/pools.py).

Every node runs ``ray start --block`` in a session of its own, so a node is the processes of that
session (Ray gives its workers process groups of their own, inside it): the cluster stops a node (or
all of them) by killing those PIDs, and finally any process left under its own ``--temp-dir``. The test process never connects to the cluster as a driver (another session Ray
may live in it): it talks to the head's dashboard (``serve deploy``, the state API) over HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
VALUES = ROOT / "helm" / "internvl-mesh" / "values.yaml"
RAY = [sys.executable, "-m", "ray.scripts.scripts"]
SERVE = [sys.executable, "-m", "ray.serve.scripts"]

# Node death is noticed after period × threshold (defaults: 3 s × 5) instead of 15 s.
HEAD_ENV = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}
NODE_ENV = {
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
    "RAY_SERVE_LOG_TO_STDERR": "0",
    "PYTHONPATH": str(ROOT),
    # Replicas and handles push autoscaling metrics every second (default 10 s), so a scaling test
    # sees a burst within seconds.
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "1",
}


def group_resources(group: str) -> dict[str, float]:
    """The custom resources the chart's worker group ``group`` advertises (its values, as numbers)."""
    values = yaml.safe_load(VALUES.read_text())
    return {k: float(v) for k, v in values["workerGroups"][group]["rayResources"].items()}


@dataclass
class Node:
    name: str
    group: str
    proc: subprocess.Popen
    log: Path
    resources: dict[str, float] = field(default_factory=dict)
    node_id: str = ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """Every process of the node at once: its session (``ray start``, raylet, agents) and the worker
        processes there, which Ray puts in process groups of their own within that session."""
        if self.alive():
            for pid in session_members(self.proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(30)


def session_members(sid: int) -> list[int]:
    """The PIDs whose session id is ``sid`` (field 6 of /proc/<pid>/stat)."""
    out = []
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            stat = (pid_dir / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[3]) == sid:
            out.append(int(pid_dir.name))
    return out


class RayCluster:
    """``RayCluster(nodes=[("cpu-0", "cpu"), ("vision-0", "encoder"), ...]).start()``; ``stop()``."""

    def __init__(self, nodes: list[tuple[str, str]], *, num_cpus: int = 4, object_store_mb: int = 200):
        self.spec = nodes
        self.num_cpus = num_cpus
        self.object_store = str(object_store_mb * 1024 * 1024)
        self.temp_dir = tempfile.mkdtemp(prefix="ivm-mn-", dir="/tmp")
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.nodes: dict[str, Node] = {}

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _ports(self) -> list[str]:
        return [
            f"--metrics-export-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
        ]

    def _start_node(self, name: str, group: str, head: bool) -> Node:
        resources = group_resources(group)
        args = [*RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={self.num_cpus}"]
        args += [f"--resources={json.dumps(resources)}", f"--object-store-memory={self.object_store}"]
        args += [
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--node-name={name}",
            *self._ports(),
        ]
        if head:
            args += [
                "--head",
                f"--port={self.gcs_port}",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ]
        else:
            args += [f"--address={self.address}"]
        log = Path(self.temp_dir) / f"node-{name}.log"
        env = {**os.environ, **NODE_ENV, **(HEAD_ENV if head else {})}
        with open(log, "w") as out:
            proc = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
            )
        node = Node(name, group, proc, log, resources)
        self.nodes[name] = node
        return node

    def start(self, timeout_s: float = 120) -> RayCluster:
        (head_name, head_group), *workers = self.spec
        self._start_node(head_name, head_group, head=True)
        self._wait(lambda: self._get("/api/version") is not None, timeout_s, "the head's dashboard")
        for name, group in workers:
            self.start_worker(name, group, timeout_s)
        self._wait(lambda: len(self.alive_nodes()) == len(self.spec), timeout_s, "every node")
        self._name_nodes()
        return self

    def start_worker(self, name: str, group: str, timeout_s: float = 120, attempts: int = 3) -> Node:
        """A worker node; on a loaded machine a raylet sometimes misses Ray's start-up timeout, so a
        node whose ``ray start`` exits is started again (``attempts`` in all)."""
        for attempt in range(1, attempts + 1):
            node = self._start_node(name, group, head=False)
            try:
                node.proc.wait(8)  # ray start --block exits early only when the node failed
            except subprocess.TimeoutExpired:
                return node
            if attempt == attempts:
                raise RuntimeError(f"node {name} did not start:\n{node.log.read_text()[-3000:]}")
        raise AssertionError("unreachable")

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            dead = [n.name for n in self.nodes.values() if not n.alive()]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(n.log.read_text()[-2000:] for n in self.nodes.values())
                raise RuntimeError(f"{what} did not come up (dead: {dead}):\n{logs}")
            time.sleep(0.5)

    def _get(self, path: str) -> Any:
        try:
            with urllib.request.urlopen(self.dashboard + path, timeout=10) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return None

    def alive_nodes(self) -> list[dict[str, Any]]:
        """The state API's nodes that are ALIVE (id, resources)."""
        from ray.util.state import list_nodes

        try:
            nodes = list_nodes(address=self.dashboard, filters=[("state", "=", "ALIVE")], timeout=10)
        except Exception:  # the dashboard is still starting
            return []
        return [{"node_id": n.node_id, "name": n.node_name, "resources": n.resources_total} for n in nodes]

    def _name_nodes(self) -> None:
        """Each node's Ray id, by the name it was started with (``--node-name``)."""
        ids = {n["name"]: n["node_id"] for n in self.alive_nodes()}
        for node in self.nodes.values():
            node.node_id = ids[node.name]

    def group_of(self, node_id: str) -> str:
        return next(n.group for n in self.nodes.values() if n.node_id == node_id)

    def name_of(self, node_id: str) -> str:
        return next((n.name for n in self.nodes.values() if n.node_id == node_id), "?")

    def serve_deploy(self, config: dict[str, Any], timeout_s: float = 120) -> None:
        path = Path(self.temp_dir) / "serve-config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        subprocess.run(
            [*SERVE, "deploy", str(path), "--address", self.dashboard],
            check=True,
            capture_output=True,
            timeout=timeout_s,
            env={**os.environ, **NODE_ENV},
        )

    def serve_applications(self) -> dict[str, Any]:
        """Serve's own view (``GET /api/serve/applications/``): applications, deployments, replicas."""
        return (self._get("/api/serve/applications/") or {}).get("applications", {})

    def wait_running(self, names: list[str], timeout_s: float = 240) -> None:
        def running() -> bool:
            apps = self.serve_applications()
            failed = [n for n in names if apps.get(n, {}).get("status") in ("DEPLOY_FAILED", "UNHEALTHY")]
            if failed:
                raise RuntimeError(f"applications failed: {[apps[n].get('message') for n in failed]}")
            return all(apps.get(n, {}).get("status") == "RUNNING" for n in names)

        self._wait(running, timeout_s, f"applications {names}")

    def stop(self) -> None:
        for node in reversed(list(self.nodes.values())):
            node.kill()
        self._kill_leftovers()
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """Any process still running under this cluster's temp dir (a worker that left its group)."""
        me = os.getpid()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit() or int(pid_dir.name) == me:
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
            except OSError:
                continue
            if self.temp_dir.encode() in cmdline:
                try:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass
