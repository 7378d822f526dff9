"""Remote images, where a deployment enables them: allow-listed hosts, public addresses only, bounded
size and time. No test leaves this machine: address checks use real resolution of local names and
literal addresses, and downloads go through an in-process HTTP transport that answers for the host."""

import asyncio

import httpx
import pytest

from gateway.fetch import RemoteImageFetcher, host_allowed, public_address
from services.common.errors import InvalidArgument
from tests.support.gateway import MODEL, UvicornThread, make_gateway
from tests.support.images import png

PUBLIC = "93.184.216.34"


async def _public(host, port):
    return [PUBLIC]


def _serving(body: bytes, status: int = 200, delay: float = 0.0):
    async def handler(request: httpx.Request) -> httpx.Response:
        if delay:
            await asyncio.sleep(delay)
        return httpx.Response(status, content=body, headers={"content-type": "image/png"})

    return httpx.MockTransport(handler)


def test_allow_list_patterns():
    assert host_allowed("img.example.com", ["*.example.com"])
    assert host_allowed("Example.COM.", ["example.com"])
    assert not host_allowed("example.com", ["*.example.com"])
    assert not host_allowed("example.com.evil.net", ["example.com"])


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "0.0.0.0",
        "224.0.0.1",
    ],
)
def test_non_public_addresses(address):
    assert not public_address(address)


def test_public_address():
    assert public_address(PUBLIC) and public_address("2606:4700:4700::1111")


@pytest.mark.parametrize(
    "url,reason",
    [
        ("https://other.example.org/a.png", "image_host_not_allowed"),
        ("ftp://img.example.com/a.png", "image_url_invalid"),
        ("https://user:pw@img.example.com/a.png", "image_url_invalid"),
        ("http://localhost/a.png", "image_host_not_public"),  # allowed by name, resolves to loopback
        ("http://127.0.0.1/a.png", "image_host_not_public"),
        ("http://10.0.0.7/a.png", "image_host_not_public"),
    ],
)
async def test_refusals(url, reason):
    fetcher = RemoteImageFetcher(
        ["*.example.com", "img.example.com", "localhost", "127.0.0.1", "10.0.0.7"],
        max_bytes=1 << 20,
        timeout_s=5,
    )
    with pytest.raises(InvalidArgument) as err:
        await fetcher.fetch(url)
    assert err.value.reason == reason


async def test_size_cap_timeout_and_status():
    big = RemoteImageFetcher(
        ["img.example.com"], max_bytes=1024, timeout_s=5, resolver=_public, transport=_serving(b"x" * 5000)
    )
    with pytest.raises(InvalidArgument, match="larger"):
        await big.fetch("https://img.example.com/big.png")
    slow = RemoteImageFetcher(
        ["img.example.com"],
        max_bytes=1 << 20,
        timeout_s=0.2,
        resolver=_public,
        transport=_serving(b"x", delay=1.0),
    )
    with pytest.raises(InvalidArgument, match="longer than"):
        await slow.fetch("https://img.example.com/slow.png")
    missing = RemoteImageFetcher(
        ["img.example.com"],
        max_bytes=1 << 20,
        timeout_s=5,
        resolver=_public,
        transport=_serving(b"", status=404),
    )
    with pytest.raises(InvalidArgument, match="404"):
        await missing.fetch("https://img.example.com/none.png")


def test_gateway_fetches_an_allowed_remote_image(cores):
    from gateway.http_api import create_http_app
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter

    fetcher = RemoteImageFetcher(
        ["img.example.com"],
        max_bytes=1 << 20,
        timeout_s=5,
        resolver=_public,
        transport=_serving(png(600, 300, seed=8)),
    )
    gw = make_gateway(cores, KeyStore(None), LocalLimiter())
    gw.fetcher = fetcher
    body = {
        "model": MODEL,
        "max_tokens": 3,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "https://img.example.com/cat.png"}},
                    {"type": "text", "text": "What?"},
                ],
            }
        ],
    }
    with UvicornThread(create_http_app(gw)) as server:
        r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 3 * 256
        body["messages"][0]["content"][0]["image_url"]["url"] = "https://elsewhere.example.net/cat.png"
        r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and "allow-list" in r.json()["error"]["message"]
