"""Rendering and validating the Helm chart: helm, Kubernetes schemas, KubeRay's CRD, Serve's option names.

Used by tests/helm and by scripts/ci_chart.sh. No cluster is involved: everything here works on the
output of ``helm template``.
"""

from __future__ import annotations

import base64
import copy
import functools
import os
import re
import subprocess
import typing
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "internvl-mesh"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
# The values files the chart is rendered with: the defaults, and each example.
CASES = {"defaults": []} | {p.stem: [p] for p in EXAMPLES}
# KubeRay's RayService CRD, vendored with its origin and licence in tests/helm/crds/README.md.
CRD = Path(
    os.environ.get("KUBERAY_CRD", Path(__file__).resolve().parent / "crds" / "ray.io_rayservices.yaml")
)
HELM_DEFAULT = ROOT / ".tools" / "kubectl-layer" / "layer" / "helm" / "helm"
KUBERNETES_VERSION = "1.33.0"
RELEASE = "mesh"
NAMESPACE = "inference"


# --------------------------------------------------------------------------------------------- helm


@functools.cache
def helm() -> str:
    """The helm binary: $HELM, or .tools/ (installed by scripts/ci_chart.sh --install if missing)."""
    if os.environ.get("HELM"):
        return os.environ["HELM"]
    if not HELM_DEFAULT.exists():
        subprocess.run([str(ROOT / "scripts" / "ci_chart.sh"), "--install"], check=True, cwd=ROOT)
    if not HELM_DEFAULT.exists():
        raise RuntimeError(f"helm is missing at {HELM_DEFAULT} after scripts/ci_chart.sh --install")
    return str(HELM_DEFAULT)


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm(), *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


def _values_args(values: list[Path | str], sets: list[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out += ["-f", str(v)]
    for s in sets:
        out += ["--set", s]
    return out


def template(values: list[Path | str] = (), sets: list[str] = ()) -> subprocess.CompletedProcess:
    return run_helm(
        "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *_values_args(list(values), list(sets))
    )


def render(values: list[Path | str] = (), sets: list[str] = ()) -> list[dict[str, Any]]:
    proc = template(values, sets)
    if proc.returncode != 0:
        raise AssertionError(f"helm template failed:\n{proc.stderr}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def lint(values: list[Path | str] = ()) -> subprocess.CompletedProcess:
    return run_helm("lint", "--strict", str(CHART), "--namespace", NAMESPACE, *_values_args(list(values), []))


def rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    return rs


def serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(rayservice(docs)["spec"]["serveConfigV2"])


# ------------------------------------------------------------------ Kubernetes schemas (built-in kinds)

# prometheus-operator's CRDs are not available offline: these kinds get a structural check instead.
MONITOR_KINDS = {
    ("monitoring.coreos.com/v1", "PodMonitor"): {"selector", "podMetricsEndpoints"},
    ("monitoring.coreos.com/v1", "ServiceMonitor"): {"selector", "endpoints"},
}


def validate_builtin(doc: dict[str, Any]) -> list[str]:
    """Errors of one non-RayService object against the Kubernetes OpenAPI schemas (strict)."""
    import kubernetes_validate as kv

    key = (doc.get("apiVersion"), doc.get("kind"))
    if key in MONITOR_KINDS:
        spec = doc.get("spec", {})
        unknown = set(spec) - MONITOR_KINDS[key] - {"namespaceSelector", "jobLabel", "podTargetLabels"}
        missing = MONITOR_KINDS[key] - set(spec)
        return [f"{key[1]}: unknown spec keys {sorted(unknown)}"] * bool(unknown) + [
            f"{key[1]}: missing spec keys {sorted(missing)}"
        ] * bool(missing)
    try:
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
    except kv.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return [f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}"]
    except kv.SchemaNotFoundError as exc:
        return [f"{doc['kind']}: no schema for {key}: {exc}"]
    return []


# ------------------------------------------------------------------------- KubeRay's RayService CRD


def _strict(node: Any) -> Any:
    """openAPIV3Schema -> JSON Schema that refuses unknown fields, as the API server does."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("format") in {"int32", "int64", "quantity"} or "format" in out:
        out.pop("format", None)
    return out


@functools.cache
def rayservice_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(v1["schema"]["openAPIV3Schema"])
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    return schema


def validate_rayservice(doc: dict[str, Any]) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(rayservice_schema())
    return [
        f"RayService: {'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
        for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    ]


# ----------------------------------------------------------------------- Serve's real option names


def _models_in(annotation: Any) -> list[type]:
    from pydantic import BaseModel

    found: list[type] = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.append(annotation)
    for arg in typing.get_args(annotation):
        found += _models_in(arg)
    return found


def _check_model_keys(data: Any, model: type, where: str) -> list[str]:
    if not isinstance(data, dict):
        return []
    errors = []
    fields = model.model_fields
    for key, value in data.items():
        if key not in fields:
            errors.append(f"{where}.{key}: not an option of {model.__name__} (known: {', '.join(fields)})")
            continue
        if key == "args":  # the application's own arguments: checked by check_deployment_options
            continue
        for sub in _models_in(fields[key].annotation):
            if isinstance(value, list):
                for i, item in enumerate(value):
                    errors += _check_model_keys(item, sub, f"{where}.{key}[{i}]")
            else:
                errors += _check_model_keys(value, sub, f"{where}.{key}")
            break
    return errors


def check_serve_keys(cfg: dict[str, Any]) -> list[str]:
    """Unknown keys anywhere in a Serve config (Serve's pydantic schema would silently drop them).

    Beyond Serve's own schema, each application's ``args.deployment_options`` is passed to
    ``serve.deployment(...)``: its keys must be that function's parameters, and its
    ``autoscaling_config`` / ``ray_actor_options`` / placement fields Serve's own option names.
    """
    import inspect

    from ray import serve
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import RayActorOptionsSchema, ServeDeploySchema

    errors = _check_model_keys(cfg, ServeDeploySchema, "serveConfigV2")
    params = set(inspect.signature(serve.deployment).parameters) - {"_func_or_class", "name"}
    for app in cfg.get("applications", []):
        opts = (app.get("args") or {}).get("deployment_options")
        where = f"serveConfigV2.applications[{app.get('name')}].args.deployment_options"
        if opts is None:
            errors.append(f"{where}: missing")
            continue
        for key in opts:
            if key not in params:
                errors.append(f"{where}.{key}: not a parameter of serve.deployment")
        errors += _check_model_keys(
            opts.get("autoscaling_config") or {}, AutoscalingConfig, f"{where}.autoscaling_config"
        )
        errors += _check_model_keys(
            opts.get("ray_actor_options") or {}, RayActorOptionsSchema, f"{where}.ray_actor_options"
        )
        strategy = opts.get("placement_group_strategy")
        if strategy is not None and strategy not in {"PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"}:
            errors.append(f"{where}.placement_group_strategy: {strategy!r} is not a placement strategy")
    try:
        ServeDeploySchema.model_validate(cfg)
    except Exception as exc:  # noqa: BLE001 - the message is the finding
        errors.append(f"serveConfigV2: rejected by ServeDeploySchema: {exc}")
    return errors


# ------------------------------------------------------------------- the chart's values -> MeshConfig


def _merge(base: Any, over: Any) -> Any:
    """Helm's merge of user values over defaults (maps merge, null deletes, the rest replaces)."""
    if not isinstance(base, dict) or not isinstance(over, dict):
        return copy.deepcopy(over)
    out = copy.deepcopy(base)
    for k, v in over.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge(out.get(k), v) if isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def chart_values(values: list[Path | str] = ()) -> dict[str, Any]:
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    for v in values:
        merged = _merge(merged, yaml.safe_load(Path(v).read_text()) or {})
    return merged


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


# Maps whose keys are not chart fields but passed through (service config fields, Ray resource names).
_PASS_THROUGH = {"resources", "preprocess", "encoderSettings", "decoderSettings"}


def _snake_tree(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    return {_snake(k): (copy.deepcopy(v) if k in _PASS_THROUGH else _snake_tree(v)) for k, v in node.items()}


def _deployment(d: dict[str, Any]) -> dict[str, Any]:
    d = _snake_tree(d)
    d["autoscaling"] = d.pop("autoscaling")
    return d


def _gateway_tls(values: dict) -> dict:
    tls = values.get("gatewayTls") or {}
    if not tls.get("existingSecret"):
        return {}
    base = tls["mountPath"].rstrip("/")
    return {"ops": {"tls": {"cert_file": f"{base}/tls.crt", "key_file": f"{base}/tls.key"}}}


def mesh_config_data(values: dict[str, Any], release: str = RELEASE) -> dict[str, Any]:
    """The MeshConfig (mesh/topology.py) that the chart's values describe."""
    mesh = values["mesh"]
    fullname = values.get("fullnameOverride") or (
        release if "internvl-mesh" in release else f"{release}-internvl-mesh"
    )[:50].rstrip("-")
    redis = values["redis"]
    url = (
        f"redis://{fullname}-redis:6379/{redis['database']}" if redis["enabled"] else redis["external"]["url"]
    )
    limits = values["limitsRedis"]
    limits_url = f"redis://{fullname}-limits-redis:6379/0" if limits["enabled"] else limits["external"]["url"]
    keys = values["apiKeys"]
    tenants = f"{keys['mountPath'].rstrip('/')}/{keys['secretKey']}" if keys["enabled"] else ""
    models = []
    for m in mesh["models"]:
        full = _merge(mesh["modelDefaults"], m)
        item = _snake_tree({k: v for k, v in full.items() if k not in ("encoder", "decoder")})
        item["encoder"] = _deployment(full["encoder"])
        item["decoder"] = _deployment(full["decoder"])
        models.append(item)
    return {
        "models": models,
        "preprocess": copy.deepcopy(mesh["preprocess"]),
        "preprocess_deployment": _deployment(mesh["preprocessDeployment"]),
        "gateway": {
            "host": "0.0.0.0",
            "tenants_file": tenants,
            **_snake_tree(mesh["gateway"]),
            **_gateway_tls(values),
        },
        "gateway_deployment": _deployment(mesh["gatewayDeployment"]),
        "redis": {
            "url": url,
            "password_env": "REDIS_PASSWORD",
            "limits_url": limits_url,
            "limits_password_env": "REDIS_LIMITS_PASSWORD",
            **_snake_tree(mesh["redis"]),
        },
        "cache": _snake_tree(mesh["cache"]),
        "grpc": _snake_tree(mesh["grpc"]),
        "tracing": _snake_tree(mesh["tracing"]),
    }


def expected_serve_config(values_files: list[Path | str] = ()) -> dict[str, Any]:
    from mesh.topology import MeshConfig, render_serve_config

    return render_serve_config(MeshConfig.model_validate(mesh_config_data(chart_values(values_files))))


# ------------------------------------------------------------------------------------ secret scan

_SECRET_PATTERNS = [
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"), "a private key"),
    (re.compile(r"\bhf_[A-Za-z0-9]{30,}"), "a Hugging Face token"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{20,}"), "an API key"),
    (re.compile(r"\b(ghp|gho|github_pat)_[A-Za-z0-9_]{20,}"), "a GitHub token"),
    (re.compile(r"\bAKIA[0-9A-Z]{16}\b"), "an AWS access key"),
    (re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]*:[^/\s@]+@"), "credentials in a URL"),
]
_SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|api_?keys?|credential|auth|otlp_headers)")
_INDIRECT = re.compile(r"(?i)(_env|_file|secretname|existingsecret|secretkey|secretkeyref|authoptions)$")


def _strings(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _strings(v, f"{path}[{i}]")
    elif isinstance(node, str):
        yield path, node


def _envs(node: Any, path: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "env" and isinstance(v, list):
                for e in v:
                    yield f"{path}.env", e
            else:
                yield from _envs(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _envs(v, f"{path}[{i}]")


def scan_secrets(docs: list[dict[str, Any]]) -> list[str]:
    """Secret material anywhere outside Secret objects; secret-looking env vars not from a Secret."""
    findings: list[str] = []
    secret_values = set()
    for d in docs:
        if d["kind"] == "Secret":
            for v in (d.get("data") or {}).values():
                secret_values.add(base64.b64decode(v).decode("utf-8", "replace"))
            for v in (d.get("stringData") or {}).values():
                secret_values.add(v)
    secret_values = {v for v in secret_values if len(v) >= 8}
    for d in docs:
        if d["kind"] == "Secret":
            continue
        name = f"{d['kind']}/{d['metadata']['name']}"
        texts = list(_strings(d))
        if d["kind"] == "RayService":
            texts += list(_strings(yaml.safe_load(d["spec"]["serveConfigV2"]), ".serveConfigV2"))
        for path, text in texts:
            for pattern, what in _SECRET_PATTERNS:
                if pattern.search(text):
                    findings.append(f"{name} {path}: {what}")
            for secret in secret_values:
                if secret in text:
                    findings.append(f"{name} {path}: contains the value of a Secret")
        for path, env in _envs(d):
            if _SECRET_NAME.search(env.get("name", "")) and "value" in env:
                findings.append(f"{name} {path}: {env['name']} has an inline value (use secretKeyRef)")
        if d["kind"] == "RayService":
            cfg = yaml.safe_load(d["spec"]["serveConfigV2"])
            for path, _ in _strings(cfg, ".serveConfigV2"):
                key = path.rsplit(".", 1)[-1].split("[")[0]
                if _SECRET_NAME.search(key) and not _INDIRECT.search(key):
                    findings.append(f"{name} {path}: a secret-named key in serveConfigV2")
    return findings


def validate_all(docs: list[dict[str, Any]]) -> list[str]:
    errors: list[str] = []
    for d in docs:
        errors += validate_rayservice(d) if d["kind"] == "RayService" else validate_builtin(d)
    return errors
