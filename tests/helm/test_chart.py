"""The Helm chart, proven without a cluster: lint, render, strict schemas, Serve config, secrets."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helm import chartkit
from tests.helm.chartkit import CASES

BROKEN = Path(__file__).parent / "values"


def test_three_or_more_examples():
    assert len(chartkit.EXAMPLES) >= 3, chartkit.EXAMPLES


@pytest.mark.parametrize("case", CASES)
def test_lint_strict(case):
    proc = chartkit.lint(CASES[case])
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", CASES)
def test_objects_match_kubernetes_and_kuberay_schemas(rendered, case):
    docs = rendered(case)
    assert {"RayService", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= {d["kind"] for d in docs}
    assert chartkit.validate_all(docs) == []


@pytest.mark.parametrize("case", CASES)
def test_serve_config_uses_only_real_serve_options(rendered, case):
    assert chartkit.check_serve_keys(chartkit.serve_config(rendered(case))) == []


@pytest.mark.parametrize("case", CASES)
def test_serve_config_is_what_topology_renders(rendered, case):
    """serveConfigV2 == mesh.topology.render_serve_config(MeshConfig from the same values)."""
    assert chartkit.serve_config(rendered(case)) == chartkit.expected_serve_config(CASES[case])


@pytest.mark.parametrize("case", CASES)
def test_no_secret_material_outside_secrets(rendered, case):
    assert chartkit.scan_secrets(rendered(case)) == []


def test_secret_scan_with_chart_created_secrets():
    docs = chartkit.render([BROKEN / "canary-secrets.yaml"])
    kinds = [d["metadata"]["name"] for d in docs if d["kind"] == "Secret"]
    assert any(n.endswith("-api-keys") for n in kinds) and any(n.endswith("-redis") for n in kinds)
    assert chartkit.scan_secrets(docs) == []
    text = yaml.safe_dump_all([d for d in docs if d["kind"] != "Secret"])
    assert "c4n4ry" not in text
    env = {
        e["name"]: e
        for rs in [chartkit.rayservice(docs)]
        for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        for e in g["template"]["spec"]["containers"][0]["env"]
    }
    for name in ("REDIS_PASSWORD", "HF_TOKEN", "OTEL_EXPORTER_OTLP_HEADERS", "IVM_KEY_HMAC_SECRET"):
        assert "secretKeyRef" in env[name]["valueFrom"], name


def test_secret_scan_catches_inline_secrets(rendered):
    # values.schema.json already refuses a secret-named env var with an inline value...
    proc = chartkit.template([BROKEN / "broken-inline-secret-env.yaml"])
    assert proc.returncode != 0 and "/workerGroups/cpu/extraEnv/0" in proc.stderr, proc.stderr
    # ...and the scan catches one however it got into the render.
    docs = yaml.safe_load_all(yaml.safe_dump_all(rendered("defaults")))
    docs = [d for d in docs if d]
    rs = chartkit.rayservice(docs)
    env = rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"]
    env.append({"name": "HF_TOKEN", "value": "x"})
    rs["spec"]["serveConfigV2"] += "\nredis_password: hunter2\n"
    rs["metadata"]["annotations"] = {"note": "redis://user:hunter2@redis:6379"}
    findings = "\n".join(chartkit.scan_secrets(docs))
    assert "HF_TOKEN has an inline value" in findings, findings
    assert "secret-named key" in findings and "credentials in a URL" in findings, findings


def test_schema_catches_typos_in_the_rayservice(rendered):
    rs = yaml.safe_load(yaml.safe_dump(chartkit.rayservice(rendered("defaults"))))
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["minReplica"] = 1
    rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "imagePullPolicy"
    ] = 3
    errors = chartkit.validate_rayservice(rs)
    assert any("minReplica" in e for e in errors) and any("imagePullPolicy" in e for e in errors), errors


def test_serve_key_check_catches_typos(rendered):
    cfg = chartkit.serve_config(rendered("defaults"))
    cfg["http_options"]["prot"] = 8000
    cfg["applications"][0]["args"]["deployment_options"]["autoscaling_config"]["max_replica"] = 3
    cfg["applications"][0]["args"]["deployment_options"]["ray_actor_options"]["num_gpu"] = 1
    errors = "\n".join(chartkit.check_serve_keys(cfg))
    assert "http_options.prot" in errors and "max_replica" in errors and "num_gpu" in errors, errors


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ("broken-wrong-type.yaml", "at '/workerGroups/decoder/gpusPerPod': got string, want integer"),
        ("broken-unknown-key.yaml", "additional properties 'maxReplica' not allowed"),
        ("broken-tp-too-large.yaml", "tensorParallelSize is 4 but workerGroups.decoder.gpusPerPod is 2"),
        ("broken-credentials-in-url.yaml", "must not contain credentials"),
    ],
)
def test_broken_values_fail_with_a_clear_message(values, message):
    proc = chartkit.template([BROKEN / values])
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_rayservice_shape(rendered):
    docs = rendered("split-gpu-pools-tp2")
    spec = chartkit.rayservice(docs)["spec"]
    assert spec["upgradeStrategy"]["type"] == "NewCluster"
    cluster = spec["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "encoder", "decoder"}
    dec = groups["decoder"]["template"]["spec"]
    assert dec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "32Gi"}} in dec["volumes"]
    enc = groups["encoder"]
    assert enc["resources"] == {"vision_pool": "1"}
    assert enc["template"]["spec"]["tolerations"] and enc["template"]["spec"]["nodeSelector"]
    cpu = groups["cpu"]["template"]["spec"]["containers"][0]
    assert cpu["readinessProbe"]["grpc"] == {"port": 9000}
    for pod in [
        cluster["headGroupSpec"]["template"]["spec"],
        *(g["template"]["spec"] for g in groups.values()),
    ]:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False
    images = {g: groups[g]["template"]["spec"]["containers"][0]["image"] for g in groups}
    head_image = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert images["cpu"] == head_image and "cpu" in head_image and "cuda" in images["decoder"]


def test_public_services_and_network_policies(rendered):
    docs = rendered("defaults")
    svcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    grpc, http = svcs["mesh-internvl-mesh-grpc"], svcs["mesh-internvl-mesh-http"]
    assert grpc["spec"]["ports"][0]["targetPort"] == 9000 and http["spec"]["ports"][0]["targetPort"] == 8000
    for s in (grpc, http):
        assert s["spec"]["selector"]["app.kubernetes.io/component"] == "cpu-worker"
    nps = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    redis = nps["mesh-internvl-mesh-redis"]
    (rule,) = redis["ingress"]
    (peer,) = rule["from"]
    assert (
        "namespaceSelector" not in peer
        and "cpu-worker" in peer["podSelector"]["matchExpressions"][0]["values"]
    )
    public = nps["mesh-internvl-mesh-public"]
    assert {p["port"] for p in public["ingress"][0]["ports"]} == {8000, 9000}
    ray = nps["mesh-internvl-mesh-ray"]
    open_ports = {p["port"] for r in ray["ingress"] for p in r.get("ports", [])}
    assert 6379 not in open_ports and 8000 not in open_ports  # GCS and Serve only from inside


def _statefulsets(docs) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == "StatefulSet"}


def test_redis_statefulset(rendered):
    docs = rendered("defaults")
    sts = _statefulsets(docs)["mesh-internvl-mesh-redis"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert "--maxmemory-policy allkeys-lru" in container["args"][0]
    assert "--maxmemory 3gb" in container["args"][0]
    assert all("secretKeyRef" in e["valueFrom"] for e in container["env"])
    docs = chartkit.render([], ["redis.persistence.enabled=true"])
    sts = _statefulsets(docs)["mesh-internvl-mesh-redis"]
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert "--appendonly yes" in sts["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert chartkit.validate_all(docs) == []


def test_limits_redis_is_a_noeviction_server_of_its_own(rendered):
    """Limits and usage records get their own Redis (eviction is per instance): noeviction, persistent,
    its own password, reachable from the gateway's pods only, named in every app's args."""
    docs = rendered("defaults")
    sts = _statefulsets(docs)["mesh-internvl-mesh-limits-redis"]
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert "--maxmemory-policy noeviction" in container["args"][0]
    assert "--appendonly yes" in container["args"][0] and sts["spec"]["volumeClaimTemplates"]
    secret = container["env"][0]["valueFrom"]["secretKeyRef"]["name"]
    assert secret == "mesh-internvl-mesh-limits-redis"
    assert secret in {d["metadata"]["name"] for d in chartkit.render([BROKEN / "canary-secrets.yaml"])}
    redis = chartkit.serve_config(docs)["applications"][-1]["args"]["common"]["redis"]
    assert redis["limits_url"] == "redis://mesh-internvl-mesh-limits-redis:6379/0"
    assert redis["limits_password_env"] == "REDIS_LIMITS_PASSWORD"
    groups = chartkit.rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    env = {g["groupName"]: {e["name"] for e in g["template"]["spec"]["containers"][0]["env"]} for g in groups}
    assert "REDIS_LIMITS_PASSWORD" in env["cpu"] and "REDIS_LIMITS_PASSWORD" not in env["decoder"]
    nps = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    (rule,) = nps["mesh-internvl-mesh-limits-redis"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "cpu-worker"
    # Without it, the limits would share the cache's Redis: refused while that one evicts.
    proc = chartkit.template([], ["limitsRedis.enabled=false"])
    assert proc.returncode != 0 and "redis.maxmemoryPolicy=noeviction" in proc.stderr, proc.stderr
    docs = chartkit.render([], ["limitsRedis.enabled=false", "redis.maxmemoryPolicy=noeviction"])
    assert "mesh-internvl-mesh-limits-redis" not in _statefulsets(docs)
    assert chartkit.serve_config(docs)["applications"][-1]["args"]["common"]["redis"]["limits_url"] == ""


def test_external_redis_and_ingress(rendered):
    docs = rendered("external-redis-ingress")
    kinds = [d["kind"] for d in docs]
    assert "StatefulSet" not in kinds and kinds.count("Ingress") == 2
    cfg = chartkit.serve_config(docs)
    redis = cfg["applications"][-1]["args"]["common"]["redis"]
    assert redis["url"].startswith("rediss://") and redis["limits_url"].startswith("rediss://redis.limits")


def test_values_documented_key_by_key():
    """Every key of values.yaml has a comment above it, or is a map of documented keys, or sits
    inside a value documented as a whole ("# --" above its parent)."""
    lines = (chartkit.CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    stack: list[tuple[int, bool]] = []  # (indent, documented as a whole value)
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip(" -"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        prev = lines[i - 1].strip() if i else ""
        documented = prev.startswith("#") or prev.startswith("- #")
        inside_value = any(whole for _, whole in stack)
        key, _, rest = stripped.lstrip("- ").partition(":")
        if not (documented or inside_value or rest.strip() == ""):
            undocumented.append(f"{i + 1}: {key}")
        stack.append((indent, prev.startswith("# --") or inside_value))
    assert undocumented == [], undocumented


def test_notes_say_how_to_call_it():
    proc = chartkit.run_helm("install", "mesh", str(chartkit.CHART), "--dry-run=client", "-n", "inference")
    assert proc.returncode == 0, proc.stderr
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "/v1/chat/completions" in notes and "buf curl" in notes and "grpc_health_probe" in notes


def test_gateway_tls_from_a_secret(tmp_path):
    """TLS at the gateway: the Secret is mounted on the gateway pods, the Serve config points the gateway
    at the files (the same as `config render` for those settings), and readiness stops using the
    plaintext gRPC probe."""
    values = tmp_path / "tls.yaml"
    values.write_text("gatewayTls:\n  existingSecret: mesh-gateway-tls\n")
    docs = chartkit.render([values])
    assert chartkit.validate_all(docs) == []
    cfg = chartkit.serve_config(docs)
    assert cfg == chartkit.expected_serve_config([values])
    gateway = next(a for a in cfg["applications"] if a["name"] == "gateway")
    assert gateway["args"]["gateway"]["ops"]["tls"]["cert_file"].endswith("/tls.crt")
    cpu = next(
        g
        for g in chartkit.rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        if g["groupName"] == "cpu"
    )
    pod = cpu["template"]["spec"]
    assert any(v.get("secret", {}).get("secretName") == "mesh-gateway-tls" for v in pod["volumes"])
    assert "tcpSocket" in pod["containers"][0]["readinessProbe"]
