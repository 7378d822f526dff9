"""``internvl-mesh keys``: a key is printed once and only its digest stored; list, revoke, rotate, remove
edit the file atomically and the key store sees the result. Also the key-change diff of the audit log,
the ops settings, and TLS credentials of the gateway's gRPC server."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from gateway.audit import AUDIT_LOGGER, AuditedKeyStore, AuditLog, diff_keys
from gateway.tenancy.keys import KeyStore
from mesh.ops_cli import keys_app
from services.common.config import ConfigError
from tests.gateway.ops.helpers import HMAC_ENV, HMAC_SECRET, env, new_key, remember, write_tenants


@pytest.fixture
def tenants(tmp_path):
    path = tmp_path / "tenants.yaml"
    write_tenants(path, [{"name": "acme"}, {"name": "globex"}], [])
    return path


def _run(*args, secret=True):
    runner = CliRunner()
    return runner.invoke(keys_app, list(args), env={HMAC_ENV: HMAC_SECRET} if secret else {HMAC_ENV: ""})


def test_create_prints_the_key_once_and_stores_its_digest(tenants):
    out = _run("create", "-f", str(tenants), "--tenant", "acme", "--key-id", "acme1", "--expires-in", "30d")
    assert out.exit_code == 0, out.output
    key = remember(out.stdout.strip())
    assert key.startswith("ivm-acme1-") and out.stdout.count(key) == 1
    text = tenants.read_text()
    secret = key.removeprefix("ivm-acme1-")  # the secret itself may contain "-"
    assert key not in text and secret not in text and "digest" in text
    store = KeyStore(tenants, env=env)
    assert store.authenticate(key).tenant.name == "acme"
    listing = _run("list", "-f", str(tenants))
    assert listing.exit_code == 0 and "acme1" in listing.stdout and "active" in listing.stdout
    assert "globex" in listing.stdout and "digest" not in listing.stdout.lower()


def test_create_refuses_what_the_gateway_would_refuse(tenants):
    assert _run("create", "-f", str(tenants), "--tenant", "nobody").exit_code == 2
    assert _run("create", "-f", str(tenants), "--tenant", "acme", secret=False).exit_code == 2
    assert _run("create", "-f", str(tenants), "--tenant", "acme", "--key-id", "bad-id").exit_code == 2
    assert "keys: []" in tenants.read_text()  # nothing written


def test_revoke_rotate_remove(tenants):
    first = remember(_run("create", "-f", str(tenants), "--tenant", "acme", "--key-id", "a1").stdout.strip())
    store = KeyStore(tenants, env=env)
    out = _run("rotate", "-f", str(tenants), "--tenant", "acme", "--window", "1h")
    assert out.exit_code == 0, out.output
    second = remember(out.stdout.strip())
    assert store.reload()
    assert store.authenticate(first).tenant.name == store.authenticate(second).tenant.name == "acme"
    later = KeyStore(tenants, env=env, now=lambda: datetime.now(UTC) + timedelta(hours=2))
    with pytest.raises(Exception, match="expired"):
        later.authenticate(first)
    assert later.authenticate(second).tenant.name == "acme"
    assert _run("revoke", "-f", str(tenants), "a1").exit_code == 0
    assert store.reload()
    with pytest.raises(Exception, match="revoked"):
        store.authenticate(first)
    assert _run("remove", "-f", str(tenants), "a1").exit_code == 0
    assert store.reload() and store.key_count == 1
    assert _run("revoke", "-f", str(tenants), "a1").exit_code == 2


def test_audited_key_store_logs_each_change_by_key_id(tenants, caplog):
    caplog.set_level(logging.INFO, logger=AUDIT_LOGGER)
    keep_key, keep = new_key("acme", key_id="keep")
    gone_key, gone = new_key("acme", key_id="gone")
    write_tenants(tenants, [{"name": "acme"}], [keep, gone])
    store = AuditedKeyStore(tenants, audit=AuditLog(), env=env)
    later = keep.model_copy(update={"expires_at": datetime(2030, 1, 1, tzinfo=UTC)})
    _, added = new_key("globex", key_id="fresh")
    write_tenants(tenants, [{"name": "acme"}, {"name": "globex"}], [later, added])
    assert store.reload()
    tenants.write_text("tenants: [not: valid")
    assert not store.reload() and not store.reload()
    events = [r.audit for r in caplog.records if r.name == AUDIT_LOGGER]
    assert events == [
        {"event": "tenant_added", "tenant": "globex"},
        {"event": "key_added", "key_id": "fresh", "tenant": "globex"},
        {"event": "key_removed", "key_id": "gone", "tenant": "acme"},
        {
            "event": "key_expiry_changed",
            "key_id": "keep",
            "tenant": "acme",
            "expires_at": "2030-01-01T00:00:00+00:00",
        },
        {"event": "tenants_file_rejected", "path": str(tenants)},
    ]


def test_diff_keys_sees_revocation_and_restoration():
    _, a = new_key("acme", key_id="a")
    revoked = a.model_copy(update={"revoked": True})
    assert [c.event for c in diff_keys({"a": a}, {"a": revoked})] == ["key_revoked"]
    assert [c.event for c in diff_keys({"a": revoked}, {"a": a})] == ["key_restored"]
    assert diff_keys({"a": a}, {"a": a}) == []


def test_ops_settings_are_bounded_and_say_what_to_fix():
    from pydantic import ValidationError

    from gateway.ops_config import OpsSettings

    s = OpsSettings()
    assert (
        s.usage.stream_key("ivm") == "ivm:usage"
        and s.usage.consumer_groups == ["billing"]
        and not s.tls.enabled
    )
    with pytest.raises(ValidationError, match="cert_file and tls.key_file"):
        OpsSettings.model_validate({"tls": {"cert_file": "/x.crt"}})
    with pytest.raises(ValidationError):
        OpsSettings.model_validate({"usage": {"max_len": 5}})
    with pytest.raises(ValidationError):
        OpsSettings.model_validate({"metrics": {"tenant_labels": ["bad name!"]}})


def _self_signed(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "tls.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return tmp_path / "tls.crt", tmp_path / "tls.key"


async def test_grpc_server_credentials_from_files_serve_tls(tmp_path):
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from gateway.ops_config import TlsSettings

    cert, key = _self_signed(tmp_path)
    tls = TlsSettings(cert_file=str(cert), key_file=str(key))
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials())
    await server.start()
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
        ) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)
    with pytest.raises(ConfigError, match="tls.key_file"):
        TlsSettings(cert_file=str(cert), key_file=str(tmp_path / "missing.key")).server_credentials()


def test_create_with_scopes_and_rotate_keeps_them(tenants):
    out = _run(
        "create",
        "-f",
        str(tenants),
        "--tenant",
        "acme",
        "--key-id",
        "s1",
        "--scope",
        "tile",
        "--scope",
        "embed",
    )
    assert out.exit_code == 0, out.output
    key = remember(out.stdout.strip())
    assert "scopes tile,embed" in out.stderr
    assert KeyStore(tenants, env=env).authenticate(key).scopes == {"tile", "embed"}
    listing = _run("list", "-f", str(tenants))
    assert "tile,embed" in listing.stdout
    for bad in (["--scope", "admin"], ["--scope", "chat", "--scope", "chat"]):
        refused = _run("create", "-f", str(tenants), "--tenant", "acme", *bad)
        assert refused.exit_code == 2 and "scope" in refused.stderr
    rotated = _run("rotate", "-f", str(tenants), "--tenant", "acme", "--window", "1h")
    assert rotated.exit_code == 0, rotated.output
    assert KeyStore(tenants, env=env).authenticate(remember(rotated.stdout.strip())).scopes == {
        "tile",
        "embed",
    }
    plain = _run("create", "-f", str(tenants), "--tenant", "globex")
    assert KeyStore(tenants, env=env).authenticate(remember(plain.stdout.strip())).scopes == {"chat"}


def test_audit_sees_a_keys_scopes_change():
    _, a = new_key("acme", key_id="a")
    wider = a.model_copy(update={"scopes": ["chat", "decode"]})
    changes = diff_keys({"a": a}, {"a": wider})
    assert [(c.event, c.scopes) for c in changes] == [("key_scopes_changed", "chat,decode")]
