"""What the rendered configs expose: the Serve config (`config render`, and the chart's serveConfigV2) gives
the internal applications no HTTP route and starts no Ray Serve gRPC proxy unless asked to; the chart's
Ingresses pass only the gateway's own paths (Kubernetes' path matching applied to the rendered rules);
the gateway's metrics port is where the chart's scrape configuration looks."""

from __future__ import annotations

import pytest

from tests.helm import chartkit

HTTP_REACHABLE = ["/v1/chat/completions", "/v1/models", "/health", "/ready"]
HTTP_UNREACHABLE = [
    "/",
    "/-/routes",
    "/-/healthz",
    "/_internal/preprocess",
    "/_internal/encoder-internvl3-8b",
    "/_internal/decoder-internvl3-8b",
    "/metrics",
    "/v1x",
    "/ready/x",
]
GRPC_REACHABLE = [
    "/internvl.gateway.v1.GatewayService/Chat",
    "/internvl.gateway.v1.GatewayService/ListModels",
    "/grpc.health.v1.Health/Check",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
]
GRPC_UNREACHABLE = [
    "/",
    "/-/routes",
    "/internvl.preprocess.v1.PreprocessService/TileImages",
    "/internvl.decoder.v1.DecoderService/Generate",
    "/ray.serve.RayServeAPIService/Healthz",
]


def _mesh_config(**gateway):
    from mesh.topology import MeshConfig
    from services.common.config import build

    return build(MeshConfig, {"models": [{"name": "m", "path": "/models/m"}], "gateway": gateway}, "test")


def test_serve_config_gives_internal_applications_no_route_and_starts_no_serve_grpc_proxy():
    from mesh.topology import render_serve_config

    cfg = render_serve_config(_mesh_config())
    routes = {a["name"]: a["route_prefix"] for a in cfg["applications"]}
    assert routes == {"preprocess": None, "encoder-m": None, "decoder-m": None, "gateway": "/"}
    assert "grpc_options" not in cfg
    assert cfg["http_options"]["host"] == "127.0.0.1"
    gateway = next(a for a in cfg["applications"] if a["name"] == "gateway")["args"]["gateway"]
    assert (gateway["host"], gateway["metrics_port"], gateway["serve_grpc_port"]) == ("127.0.0.1", 9464, 0)


def test_serve_grpc_proxy_only_when_asked_and_then_it_can_find_the_internal_applications():
    from mesh.topology import render_serve_config

    cfg = render_serve_config(_mesh_config(serve_grpc_port=9100))
    assert cfg["grpc_options"]["port"] == 9100
    routes = {a["name"]: a["route_prefix"] for a in cfg["applications"]}
    assert routes["preprocess"] == "/_internal/preprocess" and routes["decoder-m"] == "/_internal/decoder-m"


def _matches(rule: dict, path: str) -> bool:
    """Kubernetes Ingress path matching: Exact is the whole path; Prefix compares '/'-separated elements."""
    if rule["pathType"] == "Exact":
        return path == rule["path"]
    want = [e for e in rule["path"].split("/") if e]
    return [e for e in path.split("/") if e][: len(want)] == want


def _ingress_rules(docs: list[dict], kind: str) -> list[dict]:
    (ingress,) = [d for d in docs if d["kind"] == "Ingress" and d["metadata"]["name"].endswith(f"-{kind}")]
    (rule,) = ingress["spec"]["rules"]
    return rule["http"]["paths"]


@pytest.mark.parametrize(
    ("kind", "reachable", "unreachable"),
    [("http", HTTP_REACHABLE, HTTP_UNREACHABLE), ("grpc", GRPC_REACHABLE, GRPC_UNREACHABLE)],
)
def test_ingress_passes_only_the_gateways_paths(kind, reachable, unreachable):
    docs = chartkit.render(chartkit.CASES["external-redis-ingress"])
    rules = _ingress_rules(docs, kind)
    assert all(r["path"] != "/" for r in rules), rules
    assert {r["backend"]["service"]["name"] for r in rules} == {f"mesh-internvl-mesh-{kind}"}
    for path in reachable:
        assert any(_matches(r, path) for r in rules), f"{path} is not routed"
    for path in unreachable:
        assert not any(_matches(r, path) for r in rules), f"{path} is reachable through the Ingress"


def test_chart_starts_no_serve_grpc_proxy_and_scrapes_the_gateways_metrics_port():
    values = ["observability.podMonitor.enabled=true", "observability.serviceMonitor.enabled=true"]
    docs = chartkit.render([], values)
    assert chartkit.validate_all(docs) == []
    cfg = chartkit.serve_config(docs)
    assert "grpc_options" not in cfg
    assert all(a["route_prefix"] is None for a in cfg["applications"] if a["name"] != "gateway")
    groups = chartkit.rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    ports = {
        g["groupName"]: {
            p["name"]: p["containerPort"] for p in g["template"]["spec"]["containers"][0]["ports"]
        }
        for g in groups
    }
    assert ports["cpu"]["gateway-metrics"] == 9464 and "serve-grpc" not in ports["cpu"]
    assert all("gateway-metrics" not in ports[g] for g in ("encoder", "decoder"))
    (pod_monitor,) = [d for d in docs if d["kind"] == "PodMonitor"]
    assert "gateway-metrics" in [e["port"] for e in pod_monitor["spec"]["podMetricsEndpoints"]]
    (service_monitor,) = [d for d in docs if d["kind"] == "ServiceMonitor"]
    assert "gateway-metrics" in [e["port"] for e in service_monitor["spec"]["endpoints"]]
    services = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "Service"}
    gw = services["mesh-internvl-mesh-gw-metrics"]
    assert gw["selector"]["app.kubernetes.io/component"] == "cpu-worker" and gw["ports"][0]["port"] == 9464
    assert all(p["port"] != 9464 for p in services["mesh-internvl-mesh-http"]["ports"])
