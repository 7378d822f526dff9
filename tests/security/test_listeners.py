"""What `internvl-mesh serve` opens, as a user runs it with the defaults: every listener of the mesh (Serve's
HTTP proxy, the gateway's gRPC server, the metrics listener) on 127.0.0.1 only; no Ray Serve gRPC proxy
(it would listen on every interface, unauthenticated); no HTTP route to the internal applications; metrics
on their own listener, not on the public HTTP port.

Ray's own ports (GCS, raylet, object manager, dashboard agent, workers) are Ray's, behind Ray's own
authentication, and not checked here. One `serve` for the whole module."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import grpc
import httpx
import psutil
import pytest

from gateway.metrics import METRIC_NAMES
from services.demo import DEMO_MODEL_NAME
from tests.support.serve_process import serve_process

pytestmark = [pytest.mark.ray, pytest.mark.slow]

OLD_SERVE_GRPC_PORT = 9100  # the Serve gRPC proxy's port in earlier releases' default config
SERVE_GRPC_HEALTHZ = "/ray.serve.RayServeAPIService/Healthz"  # answered by Serve's gRPC proxy only
INTERNAL_APPS = ("preprocess", f"encoder-{DEMO_MODEL_NAME}", f"decoder-{DEMO_MODEL_NAME}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-listeners") / "serve.log"
    with serve_process(log) as proc:  # no --model: the embedded demo model, the defaults otherwise
        yield proc


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _listening(procs: list[psutil.Process]) -> list[tuple[psutil.Process, str, int]]:
    """(process, address, port) of every listening TCP socket of ``procs``; IPv4-mapped IPv6
    addresses (gRPC's dual-stack sockets) as the IPv4 address."""
    out = []
    for proc in procs:
        try:
            conns = proc.net_connections(kind="tcp")
        except psutil.NoSuchProcess:
            continue
        for c in conns:
            if c.status != psutil.CONN_LISTEN:
                continue
            ip = ipaddress.ip_address(c.laddr.ip.split("%")[0])
            mapped = getattr(ip, "ipv4_mapped", None)
            out.append((proc, str(mapped or ip), c.laddr.port))
    return out


def _cmdline(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline())
    except psutil.NoSuchProcess:
        return ""


def test_every_listener_of_the_mesh_is_on_loopback_only(served):
    listening = _listening(_tree(served["proc"].pid))
    for what in ("http_port", "grpc_port", "metrics_port"):
        port = served[what]
        addresses = {address for _, address, p in listening if p == port}
        assert addresses == {"127.0.0.1"}, f"{what} {port} listens on {addresses or 'nothing'}"


def test_no_ray_serve_grpc_proxy(served):
    procs = _tree(served["proc"].pid)
    listening = _listening(procs)
    assert not [a for _, a, p in listening if p == OLD_SERVE_GRPC_PORT], "something listens on 9100"
    proxies = [p for p in procs if "ProxyActor" in _cmdline(p)]
    assert proxies, "no Serve proxy process found"
    ports = {port for proc, _, port in listening if proc in proxies} - {served["http_port"]}
    answering = []
    for port in sorted(ports):  # the proxy process's other ports are Ray's own (its worker's server)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary(SERVE_GRPC_HEALTHZ)
            try:
                call(b"", timeout=5)
                answering.append(port)
            except grpc.RpcError:
                pass
    assert answering == [], f"Serve's gRPC proxy answers on {answering}"


def test_internal_applications_have_no_http_route(served):
    for app in INTERNAL_APPS:
        r = httpx.get(f"{served['base']}/_internal/{app}", timeout=30)
        assert r.status_code == 404, (app, r.status_code)
    routes = httpx.get(f"{served['base']}/-/routes", timeout=30).json()
    assert routes == {"/": "gateway"}


def test_metrics_only_on_their_own_listener(served):
    assert httpx.get(f"{served['base']}/metrics", timeout=30).status_code == 404
    url = f"http://127.0.0.1:{served['metrics_port']}/metrics"
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200
    for name in METRIC_NAMES:
        assert name in r.text, name
    assert f"internvl-mesh: metrics (Prometheus) on {url}" in Path(served["log"]).read_text()
