"""The chart's boundaries, from its rendered manifests: the mesh secret reaches every Ray pod by
reference only; Ray's ports (and Serve's gRPC proxy, where on) are open only between the release's Ray
pods, to the KubeRay operator in its own namespace and, for the metrics ports, to the monitoring
namespace; a peer list that does not pin a namespace is refused."""

from __future__ import annotations

import json

import pytest

from tests.helm import chartkit

RAY_PORTS_FROM_ELSEWHERE = {8265, 52365}


def _containers(docs):
    spec = chartkit.rayservice(docs)["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _policy(docs, suffix):
    return next(d for d in docs if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].endswith(suffix))


def test_every_ray_pod_reads_the_mesh_secret_by_reference_and_nothing_holds_its_value():
    docs = chartkit.render()
    (secret,) = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-mesh")]
    for container in _containers(docs):
        (env,) = [e for e in container["env"] if e["name"] == "IVM_MESH_SECRET"]
        assert "value" not in env
        assert env["valueFrom"]["secretKeyRef"] == {
            "name": secret["metadata"]["name"],
            "key": "IVM_MESH_SECRET",
        }
    assert "IVM_MESH_SECRET" not in json.dumps(chartkit.serve_config(docs))
    mine = chartkit.render(sets=["meshSecret.existingSecret=platform-mesh-secret"])
    assert not [d for d in mine if d["kind"] == "Secret" and d["metadata"]["name"].endswith("-mesh")]
    for container in _containers(mine):
        (env,) = [e for e in container["env"] if e["name"] == "IVM_MESH_SECRET"]
        assert env["valueFrom"]["secretKeyRef"]["name"] == "platform-mesh-secret"


@pytest.mark.parametrize("serve_grpc_port", [0, 9100])
def test_ray_ports_open_only_to_the_releases_ray_pods_the_operator_and_monitoring(serve_grpc_port):
    docs = chartkit.render(sets=[f"mesh.gateway.serveGrpcPort={serve_grpc_port}"])
    rules = _policy(docs, "-ray")["spec"]["ingress"]
    ray_pods = rules[0]["from"][0]["podSelector"]
    assert set(rules[0]) == {"from"}  # every port, but from this release's Ray pods only
    assert ray_pods["matchLabels"]["app.kubernetes.io/instance"] == chartkit.RELEASE
    for rule in rules[1:]:
        ports = {p["port"] for p in rule["ports"]}
        assert serve_grpc_port not in ports
        namespaces = [
            peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for peer in rule["from"]
        ]
        assert namespaces == (["ray-system"] if ports == RAY_PORTS_FROM_ELSEWHERE else ["monitoring"]), rule


@pytest.mark.parametrize("peers", ["operatorFrom", "metricsFrom"])
def test_peers_that_do_not_pin_a_namespace_are_refused(peers, tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(f"networkPolicy:\n  {peers}:\n    - namespaceSelector: {{}}\n")
    proc = chartkit.template([values])
    assert proc.returncode != 0 and "pins one namespace" in proc.stderr
    values.write_text(f"networkPolicy:\n  {peers}: []\n")
    assert chartkit.template([values]).returncode != 0
