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
        "64:ff9b::7f00:1",  # NAT64 (RFC 6052) of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of the metadata address
        "64:ff9b::c0a8:101",  # NAT64 of 192.168.1.1
        "64:ff9b:1::5db8:d822",  # local-use NAT64 prefix, refused whatever it embeds
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "2002:5db8:d822::1",  # 6to4, refused whatever it embeds
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
        "::127.0.0.1",  # IPv4-compatible
        "::5db8:d822",  # IPv4-compatible, refused whatever it embeds
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:0:7f00:1",  # IPv4-translated
        "fec0::1",  # site-local (deprecated), outside 2000::/3
        "3fff::1",  # documentation
        "not an address",
    ],
)
def test_non_public_addresses(address):
    assert not public_address(address)


def test_public_address():
    assert public_address(PUBLIC) and public_address("2606:4700:4700::1111")
    assert public_address("64:ff9b::5db8:d822")  # NAT64 of PUBLIC: the translator sends to PUBLIC
    assert public_address("::ffff:" + PUBLIC)


@pytest.mark.parametrize(
    "url,answer,sent,host,sni",
    [
        (
            "https://img.example.com/cat.png?size=2#top",
            [PUBLIC],
            f"https://{PUBLIC}/cat.png?size=2",
            "img.example.com",
            "img.example.com",
        ),
        (
            "http://IMG.example.com:8080/a b.png",
            ["2606:4700:4700::1111"],
            "http://[2606:4700:4700::1111]:8080/a%20b.png",
            "img.example.com:8080",
            None,
        ),
        (
            "https://img.example.com:443/c.png",
            ["::ffff:" + PUBLIC],
            f"https://{PUBLIC}/c.png",
            "img.example.com",
            "img.example.com",
        ),
    ],
)
async def test_request_goes_to_the_checked_address(url, answer, sent, host, sni):
    """The request names the checked address, the original host travels in ``Host`` (with a port that is
    not the scheme's default) and, for https, as the TLS server name; the host is resolved once, so a
    resolver that answers loopback on a second call is never asked again."""
    calls, seen = [], []

    async def rebinding(name, port):
        calls.append(name)
        return answer if len(calls) == 1 else ["127.0.0.1"]

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers["host"], request.extensions.get("sni_hostname")))
        return httpx.Response(200, content=b"img")

    fetcher = RemoteImageFetcher(
        ["img.example.com"],
        max_bytes=1024,
        timeout_s=5,
        resolver=rebinding,
        transport=httpx.MockTransport(handler),
    )
    assert await fetcher.fetch(url) == b"img"
    assert calls == ["img.example.com"] and seen == [(sent, host, sni)]


@pytest.mark.parametrize(
    "url",
    [
        "https://img.example.com:99999/a.png",
        "https://img.example.com:abc/a.png",
        "http://img.example.com:0/a.png",
    ],
)
async def test_bad_ports_are_invalid(url):
    async def never(host, port):
        raise AssertionError("a malformed URL must not be resolved")

    fetcher = RemoteImageFetcher(["img.example.com"], max_bytes=1024, timeout_s=5, resolver=never)
    with pytest.raises(InvalidArgument) as err:
        await fetcher.fetch(url)
    assert err.value.reason == "image_url_invalid"


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
        body["messages"][0]["content"][0]["image_url"]["url"] = "https://img.example.com:99999/cat.png"
        r = httpx.post(server.base_url + "/chat/completions", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "image_url_invalid", r.text
