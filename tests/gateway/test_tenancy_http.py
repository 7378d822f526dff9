"""Tenancy end to end over HTTP: two gateway replicas (separate processes' worth of state: own key
stores, own Redis connection pools) in front of the same cores, sharing limits through the real Redis.
Also: namespace isolation of the embedding cache, deadlines, disconnects and oversized requests."""

import base64
import threading
import time

import httpx
import pytest
import redis
import yaml

from tests.support.gateway import MODEL, UvicornThread, make_gateway
from tests.support.gateway import chat_body as _body
from tests.support.images import png
from tests.support.ports import free_port
from tests.support.shared_redis import redis_url

DB_URL = redis_url("gateway")


def _tenants_file(path):
    from gateway.tenancy.keys import create_key

    key_a, entry_a = create_key("alpha")
    key_b, entry_b = create_key("beta")
    key_c, entry_c = create_key("gamma")
    key_d, entry_d = create_key("delta")
    generous = {"requests_per_s": 1000, "max_concurrent": 64}
    doc = {
        "tenants": [
            {"name": "alpha", "limits": generous},
            {"name": "beta", "limits": generous},
            # gamma: 2 requests per second, no burst beyond that
            {"name": "gamma", "limits": {"requests_per_s": 0.5, "burst": 2}},
            # delta: one request at a time, and a tiny daily quota
            {
                "name": "delta",
                "limits": {"max_concurrent": 1, "daily_token_quota": 5000, "requests_per_s": 100},
                "cache_namespace": "alpha",
            },
        ],
        "keys": [e.model_dump(mode="json") for e in (entry_a, entry_b, entry_c, entry_d)],
    }
    path.write_text(yaml.safe_dump(doc))
    return {"alpha": key_a, "beta": key_b, "gamma": key_c, "delta": key_d}


@pytest.fixture(scope="module")
def replicas(cores, tmp_path_factory):
    from gateway.http_api import create_http_app
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import RedisLimiter

    prefix = f"ivm:lim:test{free_port()}:"
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    keys = _tenants_file(path)
    servers = []
    for _ in range(2):
        gw = make_gateway(
            cores, KeyStore(path), RedisLimiter.from_url(DB_URL, prefix=prefix), default_timeout_s=60
        )
        servers.append(UvicornThread(create_http_app(gw)).__enter__())
    yield {"urls": [s.base_url for s in servers], "keys": keys, **cores}
    for s in servers:
        s.__exit__(None, None, None)
    client = redis.Redis.from_url(DB_URL)
    for k in client.scan_iter(f"{prefix}*"):
        client.delete(k)


def _post(url, key, body, timeout=60):
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + "/chat/completions", json=body, headers=headers, timeout=timeout)


def test_missing_and_wrong_keys_are_401(replicas):
    url = replicas["urls"][0]
    assert _post(url, None, _body()).status_code == 401
    r = _post(url, "ivm-000000000000-not-a-real-secret", _body())
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert _post(url, replicas["keys"]["alpha"], _body()).status_code == 200


def test_rate_limit_is_shared_by_both_replicas(replicas):
    key = replicas["keys"]["gamma"]
    statuses = [_post(replicas["urls"][i % 2], key, _body()).status_code for i in range(3)]
    assert statuses[:2] == [200, 200] and statuses[2] == 429
    r = _post(replicas["urls"][1], key, _body())
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_concurrency_is_counted_across_replicas(replicas):
    key = replicas["keys"]["delta"]
    started = threading.Event()
    holder: dict = {}

    def long_stream():
        with httpx.stream(
            "POST",
            replicas["urls"][0] + "/chat/completions",
            timeout=60,
            json=_body(max_tokens=300, stream=True),
            headers={"authorization": f"Bearer {key}"},
        ) as r:
            holder["status"] = r.status_code
            for _ in r.iter_lines():
                started.set()

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(30)
    r = _post(replicas["urls"][1], key, _body())
    assert r.status_code == 429 and r.json()["error"]["code"] == "concurrency"
    t.join(60)
    assert holder["status"] == 200


def test_daily_quota_reserves_and_refunds(replicas):
    key = replicas["keys"]["delta"]
    # The quota is 5000 tokens; max_tokens 6000 can never fit: a clear 400, nothing taken.
    r = _post(replicas["urls"][0], key, _body(max_tokens=6000))
    assert r.status_code in (400, 429)
    # Small requests keep working: each reserves prompt + max_tokens and refunds the unused part.
    for i in range(3):
        assert _post(replicas["urls"][i % 2], key, _body(max_tokens=200)).status_code == 200


def _image_request(img, key_url_pair):
    uri = "data:image/png;base64," + base64.b64encode(img).decode()
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": "What?"},
                ],
            }
        ],
    }
    url, key = key_url_pair
    return _post(url, key, body)


def test_no_embedding_cache_hit_across_tenants_unless_they_share_a_namespace(replicas):
    enc = replicas["encoder"]
    keys, url = replicas["keys"], replicas["urls"][0]
    img = png(700, 300, seed=99)

    def hits():
        return enc.stats.hits_lru + enc.stats.hits_shared

    assert _image_request(img, (url, keys["alpha"])).status_code == 200
    before = hits()
    assert _image_request(img, (url, keys["beta"])).status_code == 200
    assert hits() == before, "tenant beta must not hit tenant alpha's entry"
    assert _image_request(img, (url, keys["delta"])).status_code == 200  # delta shares alpha's namespace
    assert hits() == before + 1


def test_deadline_exceeded_is_504(replicas):
    r = _post(replicas["urls"][0], replicas["keys"]["alpha"], _body(max_tokens=2000, timeout=0.05))
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"


def test_client_disconnect_frees_decoder_work(replicas):
    decoder = replicas["decoder"]
    with httpx.stream(
        "POST",
        replicas["urls"][0] + "/chat/completions",
        timeout=60,
        json=_body(max_tokens=2000, stream=True),
        headers={"authorization": f"Bearer {replicas['keys']['alpha']}"},
    ) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        assert decoder.stats()["running"] >= 1
    deadline = time.monotonic() + 10
    while decoder.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stats = decoder.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_usage"] == 0


def test_oversized_and_absurd_requests(replicas):
    url, key = replicas["urls"][0], replicas["keys"]["alpha"]
    huge = "data:image/png;base64," + "A" * (30 * 1024 * 1024)
    r = _post(
        url,
        key,
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": huge}}]}],
        },
    )
    assert r.status_code == 400 and "limit" in r.json()["error"]["message"]
    too_many = [
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(png(64, 64)).decode()},
        }
    ] * 20
    r = _post(url, key, {"model": MODEL, "messages": [{"role": "user", "content": too_many}]})
    assert r.status_code == 400 and "images" in r.json()["error"]["message"]
    r = _post(url, key, _body(content="x" * (2 * 1024 * 1024)))
    assert r.status_code == 400


def test_limits_fall_back_to_a_local_limiter_when_redis_is_unreachable(cores, tmp_path):
    """A gateway whose Redis is down keeps serving under replica-local limits (fail-open default),
    and refuses with 503 when configured to fail closed."""
    from prometheus_client import CollectorRegistry

    from gateway.http_api import create_http_app
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import FallbackLimiter, LocalLimiter, RedisLimiter

    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    for fail_closed, expected in ((False, 200), (True, 503)):
        limiter = FallbackLimiter(
            RedisLimiter.from_url(dead), LocalLimiter(), fail_closed=fail_closed, registry=CollectorRegistry()
        )
        gw = make_gateway(cores, KeyStore(None), limiter)
        with UvicornThread(create_http_app(gw)) as server:
            r = httpx.post(server.base_url + "/chat/completions", json=_body(), timeout=60)
        assert r.status_code == expected, r.text
        assert limiter.degraded
