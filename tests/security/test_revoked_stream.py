"""A key revoked while its request streams: the stream ends within one reload interval of the tenants
file changing, with a ``key_revoked`` error event, and the decoder stops generating for it. A real
gateway over HTTP (tiny checkpoint in process), the real key store reloading a real file."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import yaml

from tests.support.gateway import MODEL, UvicornThread, make_gateway, reload_keys_while_serving

RELOAD_S = 0.3


@pytest.fixture(scope="module")
def served(cores, tmp_path_factory):
    from gateway.http_api import create_http_app
    from gateway.tenancy.keys import KeyStore, create_key
    from gateway.tenancy.limiter import LocalLimiter

    key, entry = create_key("acme", key_id="acme1")
    path = tmp_path_factory.mktemp("revoke") / "tenants.yaml"
    doc = {"tenants": [{"name": "acme", "limits": {"max_tokens_per_request": 1_000_000}}],
           "keys": [entry.model_dump(mode="json")]}  # fmt: skip
    path.write_text(yaml.safe_dump(doc))
    keys = KeyStore(str(path), reload_interval_s=RELOAD_S)
    app = create_http_app(make_gateway(cores, keys, LocalLimiter()))
    reload_keys_while_serving(app, keys)
    with UvicornThread(app) as server:
        yield {"url": f"http://127.0.0.1:{server.port}/v1/chat/completions", "key": key, "path": path,
               "doc": doc, "max_model_len": cores["decoder"].max_model_len}  # fmt: skip


def test_a_revoked_keys_stream_ends_within_one_reload(served):
    max_tokens = served["max_model_len"] - 64
    body = {"model": MODEL, "stream": True, "max_tokens": max_tokens, "temperature": 0,
            "messages": [{"role": "user", "content": "Count for ever."}]}  # fmt: skip
    headers = {"authorization": f"Bearer {served['key']}"}
    events, revoked_at = [], None
    with httpx.stream("POST", served["url"], json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            events.append(json.loads(line[6:]))
            if revoked_at is None and len(events) >= 3:
                served["doc"]["keys"][0]["revoked"] = True
                served["path"].write_text(yaml.safe_dump(served["doc"]))
                revoked_at = time.monotonic()
    ended_after = time.monotonic() - revoked_at
    assert events[-1].get("error", {}).get("code") == "key_revoked", events[-1]
    tokens = sum(1 for e in events if e.get("choices") and e["choices"][0]["delta"].get("content"))
    assert tokens < max_tokens - 64
    assert ended_after <= RELOAD_S + 1.0, f"the stream ended {ended_after:.2f} s after the revocation"
