"""KeyStore: authentication by digest, key lifecycle (revocation, rotation, expiry, live reload) and the
single-tenant mode, against real files on disk."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from gateway.tenancy import KeyStore, Tenant, TenantsFile, create_key, key_digest, parse_key_id
from gateway.tenancy import keys as keys_module
from services.common.config import ConfigError
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated

SECRET_ENV = "IVM_TEST_HMAC"
SECRET = "s3cr3t-for-tests"
ENV = {SECRET_ENV: SECRET}.get

TENANTS = [
    {"name": "acme", "allowed_models": ["small"], "priority": 3, "limits": {"requests_per_s": 5}},
    {"name": "globex", "allowed_models": ["*"], "cache_namespace": "shared"},
    {"name": "initech", "cache_namespace": "shared"},
]


def write(path: Path, keys: list, *, hmac_env: str | None = SECRET_ENV, tenants: list = TENANTS) -> None:
    data = {
        "tenants": tenants,
        "keys": [k.model_dump(mode="json") if hasattr(k, "model_dump") else k for k in keys],
    }
    if hmac_env:
        data["hmac_secret_env"] = hmac_env
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data), "utf-8")
    tmp.replace(path)  # atomic, as a config-management tool or a Kubernetes secret update would be


def new_key(tenant: str, **kw):
    return create_key(tenant, hmac_secret=SECRET.encode(), **kw)


@pytest.fixture
def tenants_file(tmp_path):
    path = tmp_path / "tenants.yaml"
    acme_key, acme_entry = new_key("acme", key_id="acme1")
    globex_key, globex_entry = new_key("globex")
    write(path, [acme_entry, globex_entry])
    return path, {"acme": (acme_key, acme_entry), "globex": (globex_key, globex_entry)}


def reason_of(exc_info) -> str:
    return exc_info.value.reason


def test_good_key_maps_to_its_tenant(tenants_file):
    path, made = tenants_file
    store = KeyStore(path, env=ENV)
    assert not store.single_tenant
    acme = store.authenticate(made["acme"][0]).tenant
    assert acme.name == "acme" and acme.priority == 3 and acme.limits.requests_per_s == 5
    assert acme.cache_namespace == "acme"  # default: own namespace, no cross-tenant cache hits
    assert store.authenticate(made["globex"][0]).tenant.name == "globex"
    assert store.key_count == 2


def test_missing_wrong_and_malformed_keys_are_unauthenticated(tenants_file, caplog):
    path, made = tenants_file
    store = KeyStore(path, env=ENV)
    good = made["acme"][0]
    for key, reason in [
        (None, "missing_api_key"),
        ("", "missing_api_key"),
        (good[:-1] + ("A" if good[-1] != "A" else "B"), "invalid_api_key"),  # one character off
        ("ivm-acme1-", "invalid_api_key"),
        ("Bearer " + good, "invalid_api_key"),
        ("not-a-key", "invalid_api_key"),
    ]:
        with (
            caplog.at_level(logging.INFO, logger="gateway.tenancy.keys"),
            pytest.raises(Unauthenticated) as err,
        ):
            store.authenticate(key)
        assert reason_of(err) == reason
        assert err.value.http_status == 401 and err.value.code == "UNAUTHENTICATED"
    secret_part = good.split("-", 2)[2]
    assert secret_part not in caplog.text and "acme1" in caplog.text  # key id logged, secret never


def test_a_key_is_only_valid_under_the_servers_hmac_secret(tenants_file):
    path, made = tenants_file
    # The same file with another secret in the environment: the digests no longer match.
    store = KeyStore(path, env={SECRET_ENV: "another-secret"}.get)
    with pytest.raises(Unauthenticated):
        store.authenticate(made["acme"][0])


def test_hmac_secret_env_unset_refuses_to_start(tenants_file):
    path, _ = tenants_file
    with pytest.raises(ConfigError, match=SECRET_ENV):
        KeyStore(path, env={}.get)


def test_plain_sha256_without_a_secret(tmp_path):
    path = tmp_path / "t.yaml"
    key, entry = create_key("acme")
    assert entry.digest == hashlib.sha256(key.encode()).hexdigest()
    write(path, [entry], hmac_env=None)
    assert KeyStore(path, env={}.get).authenticate(key).tenant.name == "acme"


def test_the_file_holds_digests_only(tenants_file):
    path, made = tenants_file
    text = path.read_text()
    for key, entry in made.values():
        assert key not in text
        assert key.split("-", 2)[2] not in text  # not even the secret part
        assert entry.digest in text
        assert entry.digest == hmac.new(SECRET.encode(), key.encode(), hashlib.sha256).hexdigest()
    assert SECRET not in text  # only the variable's name
    assert set(made["acme"][1].model_dump()) == {
        "key_id",
        "tenant",
        "digest",
        "created_at",
        "expires_at",
        "revoked",
        "scopes",
    }


def test_lookup_goes_through_digests_compared_in_constant_time(tenants_file, monkeypatch):
    path, made = tenants_file
    store = KeyStore(path, env=ENV)
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(keys_module.hmac, "compare_digest", spy)
    key, entry = made["acme"]
    store.authenticate(key)
    assert calls == [(key_digest(key, SECRET.encode()), entry.digest)]
    calls.clear()
    with pytest.raises(Unauthenticated):
        store.authenticate(key + "x")
    # An unknown key is compared too (against a dummy), so both paths do the same work.
    assert len(calls) == 1 and calls[0][0] == key_digest(key + "x", SECRET.encode())
    assert key not in calls[0] and key + "x" not in calls[0]


def test_revoked_and_expired_keys(tmp_path):
    path = tmp_path / "t.yaml"
    now = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
    revoked_key, revoked = new_key("acme", key_id="old")
    expiring_key, expiring = new_key("acme", key_id="exp", expires_at=now + timedelta(hours=1))
    write(path, [revoked.model_copy(update={"revoked": True}), expiring])
    clock = {"now": now}
    store = KeyStore(path, env=ENV, now=lambda: clock["now"])
    with pytest.raises(Unauthenticated) as err:
        store.authenticate(revoked_key)
    assert reason_of(err) == "key_revoked" and revoked_key not in str(err.value)
    assert store.authenticate(expiring_key).tenant.name == "acme"
    clock["now"] = now + timedelta(hours=1)
    with pytest.raises(Unauthenticated) as err:
        store.authenticate(expiring_key)
    assert reason_of(err) == "key_expired"


def test_naive_expiry_is_read_as_utc(tmp_path):
    path = tmp_path / "t.yaml"
    key, entry = new_key("acme")
    raw = entry.model_dump(mode="json")
    raw["expires_at"] = "2030-01-01T00:00:00"
    write(path, [raw])
    store = KeyStore(path, env=ENV, now=lambda: datetime(2029, 12, 31, 23, 59, tzinfo=UTC))
    assert store.authenticate(key).tenant.name == "acme"


async def test_reload_without_restart_revocation_rotation_and_bad_files(tenants_file, caplog):
    path, made = tenants_file
    old_key, old_entry = made["acme"]
    async with KeyStore(path, env=ENV, reload_interval_s=0.05) as store:
        # Rotation: a second key for the same tenant; both work at once.
        new_key_, new_entry = store.create_key("acme", key_id="acme2")
        write(path, [old_entry, new_entry, made["globex"][1]])
        await wait_until(lambda: store.key_count == 3)
        assert store.authenticate(old_key).tenant.name == "acme"
        assert store.authenticate(new_key_).tenant.name == "acme"
        # Revocation by removal: the old key stops on the next reload, the new one keeps working.
        write(path, [new_entry, made["globex"][1]])
        await wait_until(lambda: store.key_count == 2)
        with pytest.raises(Unauthenticated):
            store.authenticate(old_key)
        assert store.authenticate(new_key_).tenant.name == "acme"
        # A broken file is refused whole: the keys in force stay in force.
        with caplog.at_level(logging.ERROR, logger="gateway.tenancy.keys"):
            path.write_text("tenants: [unclosed\n")
            await wait_until(lambda: store.last_reload_error is not None)
        assert "not valid YAML" in store.last_reload_error and "previous keys stay" in caplog.text
        assert store.authenticate(new_key_).tenant.name == "acme"
        # Fixed again: picked up, error cleared.
        write(path, [new_entry.model_copy(update={"revoked": True}), made["globex"][1]])
        await wait_until(lambda: store.last_reload_error is None)
        with pytest.raises(Unauthenticated) as err:
            store.authenticate(new_key_)
        assert reason_of(err) == "key_revoked"
    assert store._task is None


def test_reload_is_by_content_not_mtime(tenants_file):
    path, made = tenants_file
    store = KeyStore(path, env=ENV)
    assert store.reload() is False  # unchanged
    entry = made["acme"][1]
    write(path, [entry.model_copy(update={"revoked": True}), made["globex"][1]])
    stat = path.stat()
    assert store.reload() is True
    # Rewritten with the earlier mtime put back: only the content tells that it changed.
    write(path, [entry, made["globex"][1]])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert store.reload() is True
    assert store.authenticate(made["acme"][0]).tenant.name == "acme"


def test_single_tenant_mode_without_a_file():
    store = KeyStore(None)
    assert store.single_tenant
    for key in (None, "", "anything"):
        tenant = store.authenticate(key).tenant
        assert tenant.name == "default" and tenant.allows_model("any-model")
    lim = tenant.limits
    # A 64-client load test must not come near the defaults.
    assert lim.max_concurrent >= 64 * 100 and lim.requests_per_s >= 10_000 and lim.tokens_per_min >= 10**9
    # Per request it gets the mesh's own bounds, the numbers README's "Limits" states.
    assert (lim.max_images_per_request, lim.max_tiles_per_request) == (16, 128)
    assert (lim.max_schema_bytes, lim.max_grammar_compile_ms) == (256 * 1024, 10_000)
    assert lim.max_n == 16
    with pytest.raises(InvalidArgument):
        store.create_key("default")


def test_an_empty_file_is_multi_tenant_with_no_keys(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("tenants: []\n")
    store = KeyStore(path)
    assert not store.single_tenant
    with pytest.raises(Unauthenticated):
        store.authenticate("ivm-x-y")


@pytest.mark.parametrize(
    "data, message",
    [
        ({"tenants": [{"name": "a", "limits": {"request_per_s": 1}}]}, "request_per_s"),
        ({"tenants": [{"name": "a", "limits": {"requests_per_s": 0}}]}, "requests_per_s"),
        ({"tenants": [{"name": "a", "limits": {"max_images_per_request": 17}}]}, "max_images_per_request"),
        ({"tenants": [{"name": "a", "limits": {"max_tiles_per_request": 129}}]}, "max_tiles_per_request"),
        ({"tenants": [{"name": "a", "limits": {"max_schema_bytes": 256 * 1024 + 1}}]}, "max_schema_bytes"),
        ({"tenants": [{"name": "a", "limits": {"max_grammar_compile_ms": 0}}]}, "max_grammar_compile_ms"),
        ({"tenants": [{"name": "a", "limits": {"max_n": 17}}]}, "max_n"),
        ({"tenants": [{"name": "a", "limits": {"max_n": 0}}]}, "max_n"),
        ({"tenants": [{"name": "a b"}]}, "name"),
        ({"tenants": [{"name": "a", "priority": 11}]}, "priority"),
        ({"tenants": [{"name": "a"}, {"name": "a"}]}, "duplicate tenant name"),
        ({"tenants": [{"name": "a", "allowed_models": []}]}, "allowed_models"),
        (
            {
                "tenants": [],
                "keys": [
                    {
                        "key_id": "k",
                        "tenant": "nobody",
                        "digest": "0" * 64,
                        "created_at": "2025-01-01T00:00:00Z",
                    }
                ],
            },
            "not in tenants",
        ),
        (
            {
                "tenants": [{"name": "a"}],
                "keys": [
                    {"key_id": "k-1", "tenant": "a", "digest": "0" * 64, "created_at": "2025-01-01T00:00:00Z"}
                ],
            },
            "key_id",
        ),
        (
            {
                "tenants": [{"name": "a"}],
                "keys": [
                    {"key_id": "k", "tenant": "a", "digest": "XYZ", "created_at": "2025-01-01T00:00:00Z"}
                ],
            },
            "digest",
        ),
        ({"tenants": [{"name": "a"}], "secret": "x"}, "secret"),
    ],
)
def test_invalid_files_name_the_field(tmp_path, data, message):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message):
        KeyStore(path)


def test_missing_file_refuses_to_start(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        KeyStore(tmp_path / "absent.yaml")


def test_tenant_policy_checks():
    parsed = TenantsFile.model_validate({"tenants": TENANTS})
    acme, globex, initech = parsed.tenants
    assert globex.cache_namespace == initech.cache_namespace == "shared"  # opt-in sharing
    acme.check_model("small")
    with pytest.raises(PermissionDenied) as err:
        acme.check_model("large")
    assert err.value.http_status == 403 and err.value.reason == "model_not_allowed"
    globex.check_model("anything")
    acme.check_request_size(images=8, tiles=48)
    for kw, reason in [({"images": 9}, "too_many_images"), ({"tiles": 49}, "too_many_tiles")]:
        with pytest.raises(InvalidArgument) as err:
            acme.check_request_size(**kw)
        assert err.value.reason == reason
    assert acme.max_tokens(None, context=8192, default=512) == 512
    assert acme.max_tokens(None, context=256, default=512) == 256  # the model's context caps the default
    assert acme.max_tokens(4096, context=8192, default=512) == 4096
    for requested, context in [(4097, 8192), (300, 256), (0, 8192)]:
        with pytest.raises(InvalidArgument) as err:
            acme.max_tokens(requested, context=context, default=512)
        assert err.value.reason == "max_tokens_out_of_range"


def test_create_key_shape():
    key, entry = create_key("acme", key_id="abc_1")
    assert key.startswith("ivm-abc_1-") and parse_key_id(key) == "abc_1"
    assert len(key.split("-", 2)[2]) >= 43  # 256 bits of randomness
    assert entry.key_id == "abc_1" and entry.tenant == "acme" and not entry.revoked
    assert create_key("acme")[0] != create_key("acme")[0]
    with pytest.raises(InvalidArgument):
        create_key("acme", key_id="has-dash")
    with pytest.raises(InvalidArgument):
        KeyStore(None).create_key("acme")


def test_store_create_key_refuses_unknown_tenants(tenants_file):
    store = KeyStore(tenants_file[0], env=ENV)
    with pytest.raises(InvalidArgument, match="unknown tenant"):
        store.create_key("nobody")
    assert isinstance(store.tenants["acme"], Tenant)


async def wait_until(predicate, timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def test_scopes_default_to_chat_and_are_validated_strictly(tmp_path):
    from gateway.tenancy import SCOPES, ApiKeyEntry

    _, entry = create_key("acme")
    assert entry.scopes == ["chat"]  # every key made before scopes existed keeps exactly what it had
    legacy = entry.model_dump(mode="json", exclude={"scopes"})
    assert ApiKeyEntry.model_validate(legacy).scopes == ["chat"]
    for bad in ([], ["chat", "chat"], ["admin"], ["Chat"], "chat"):
        with pytest.raises(ValueError):
            ApiKeyEntry.model_validate({**legacy, "scopes": bad})
    with pytest.raises(InvalidArgument, match="scope"):
        create_key("acme", scopes=["embed", "embed"])
    assert create_key("acme", scopes=list(SCOPES))[1].scopes == ["chat", "tile", "embed", "decode"]


def test_authentication_yields_the_keys_scopes(tmp_path):
    path = tmp_path / "t.yaml"
    chat_key, chat = new_key("acme", key_id="c1")
    embed_key, embed = new_key("acme", key_id="e1", scopes=["embed", "tile"])
    write(path, [chat, embed])
    store = KeyStore(path, env=ENV)
    who = store.authenticate(embed_key)
    assert (who.tenant.name, who.key_id, who.scopes) == ("acme", "e1", frozenset({"embed", "tile"}))
    who.require("tile")
    with pytest.raises(PermissionDenied) as err:
        who.require("chat")
    assert err.value.reason == "scope_not_granted" and "e1" in err.value.message
    assert store.authenticate(chat_key).scopes == frozenset({"chat"})
    # Single-tenant mode (development only) grants everything.
    assert KeyStore(None).authenticate(None).scopes == {"chat", "tile", "embed", "decode"}
