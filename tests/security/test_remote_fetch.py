"""Remote-image fetching cannot be turned into a request to this machine or its network: the host is
resolved once and the connection goes to the address that was checked (DNS rebinding), addresses that
embed a private IPv4 address are not public, and a malformed URL is the caller's error.

Everything runs for real on this machine: an HTTP(S) server on 127.0.0.1 that counts the connections it
accepts, httpx's own transport and connection pool, real TLS with a certificate for the original host
name. Only the last hop is local: the transport's network backend connects for real to loopback names
and addresses, and a public address (which no test may reach) is either refused without a connection
or, where a test says so, carried to the local server instead, after the backend has recorded it.
"""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import ssl
import threading
from pathlib import Path

import httpcore
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.fetch import RemoteImageFetcher
from services.common.errors import InvalidArgument

PUBLIC = "93.184.216.34"
SECRET = b"an internal service's answer"
LOOPBACK_NAMES = ("localhost", "127.0.0.1")


class ImageServer:
    """An HTTP(S) server on 127.0.0.1: counts the connections it accepts and records, per request, the
    ``Host`` header, the path and (with TLS) the SNI name the client sent."""

    def __init__(self, body: bytes, tls: ssl.SSLContext | None = None, headers: dict[str, str] | None = None):
        self.connections = 0
        self.requests: list[tuple[str | None, str]] = []
        self.accept_encoding: list[str | None] = []
        self.sni: list[str | None] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10

            def do_GET(self):
                owner.requests.append((self.headers.get("Host"), self.path))
                owner.accept_encoding.append(self.headers.get("Accept-Encoding"))
                self.send_response(200)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                sock, addr = super().get_request()
                owner.connections += 1
                if tls is not None:
                    sock = tls.wrap_socket(sock, server_side=True)
                return sock, addr

            def handle_error(self, request, client_address):
                pass  # a refused handshake is the client's decision, recorded by the test

        if tls is not None:
            tls.sni_callback = lambda _obj, name, _ctx: self.sni.append(name)
        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class LocalOnlyBackend(httpcore.AsyncNetworkBackend):
    """httpcore's own backend, restricted to this machine. Records every ``(host, port)`` the transport
    asks to connect to; loopback names and addresses are connected as asked; any other host is refused
    without a connection, or with ``divert_to`` connected to that port on 127.0.0.1 instead."""

    def __init__(self, divert_to: int | None = None, unreachable: tuple[str, ...] = ()):
        self.real = httpcore.AnyIOBackend()
        self.divert_to = divert_to
        self.unreachable = unreachable
        self.connects: list[tuple[str, int]] = []

    async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        self.connects.append((host, port))
        if host not in LOOPBACK_NAMES:
            if self.divert_to is None or host in self.unreachable:
                raise httpcore.ConnectError(f"{host} is not on this machine")
            host, port = "127.0.0.1", self.divert_to
        return await self.real.connect_tcp(host, port, timeout=timeout)

    async def connect_unix_socket(self, path, timeout=None, socket_options=None):
        raise httpcore.ConnectError("no unix sockets here")

    async def sleep(self, seconds):
        await self.real.sleep(seconds)


class LocalTransport(httpx.AsyncHTTPTransport):
    """httpx's real transport over a connection pool that uses ``backend``."""

    def __init__(self, backend: LocalOnlyBackend, ssl_context: ssl.SSLContext | None = None):
        super().__init__()
        self._pool = httpcore.AsyncConnectionPool(ssl_context=ssl_context, network_backend=backend)


class Rebinding:
    """A resolver that answers ``first`` on its first call and ``later`` on every other one."""

    def __init__(self, first: list[str], later: list[str]):
        self.first, self.later = first, later
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        return self.first if len(self.calls) == 1 else self.later


def _certificates(tmp: Path, san: x509.GeneralName) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A fresh CA and a server certificate (for ``san`` only) signed by it: the server's context and a
    client context that trusts the CA (and verifies host names, as the default one does)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "remote fetch test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "image server")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    (tmp / "server.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(tmp / "server.pem", tmp / "server.key")
    client = ssl.create_default_context(cadata=ca.public_bytes(serialization.Encoding.PEM).decode())
    return server, client


def _fetcher(allow, resolver, transport) -> RemoteImageFetcher:
    return RemoteImageFetcher(allow, max_bytes=1 << 20, timeout_s=10, resolver=resolver, transport=transport)


async def test_rebinding_reaches_only_the_checked_address():
    """The attacker's name answers a public address when checked and this machine afterwards (here the
    name is ``localhost``, which the system resolver maps to 127.0.0.1): a fetch that connected by name
    would read the local server. The fetcher resolves once and connects to the public address itself,
    which no test may reach, so the fetch fails; the local server sees no connection."""
    resolver = Rebinding([PUBLIC], ["127.0.0.1"])
    backend = LocalOnlyBackend()
    with ImageServer(SECRET) as server:
        fetcher = _fetcher(["localhost"], resolver, LocalTransport(backend))
        with pytest.raises(InvalidArgument) as err:
            await fetcher.fetch(f"http://localhost:{server.port}/secret.png")
    assert err.value.reason == "image_fetch_failed"
    assert resolver.calls == [("localhost", server.port)]
    assert backend.connects == [(PUBLIC, server.port)]
    assert server.connections == 0


@pytest.mark.parametrize(
    "url,answer,connect,host,path",
    [
        (
            "https://img.example.com/cat.png?size=2#top",
            [PUBLIC],
            (PUBLIC, 443),
            "img.example.com",
            "/cat.png?size=2",
        ),
        (
            "https://img.example.com:8443/dog.png",
            [PUBLIC],
            (PUBLIC, 8443),
            "img.example.com:8443",
            "/dog.png",
        ),
        (
            "https://img.example.com/v6.png",
            ["2606:4700:4700::1111", PUBLIC],
            ("2606:4700:4700::1111", 443),
            "img.example.com",
            "/v6.png",
        ),
    ],
)
async def test_https_connects_to_the_checked_address_in_the_original_name(
    tmp_path, url, answer, connect, host, path
):
    """Over real TLS: the connection goes to the first checked address (carried to the local server by
    the backend, after it recorded the address) on the URL's port, and the server sees the original
    name in SNI and in ``Host``; the certificate names only that host, so the handshake also proves the
    client checked the certificate against the name, not the address. The second resolution the
    rebinding resolver was waiting for never happens."""
    tls, trust = _certificates(tmp_path, x509.DNSName("img.example.com"))
    resolver = Rebinding(answer, ["127.0.0.1"])
    with ImageServer(b"\x89PNG image", tls) as server:
        backend = LocalOnlyBackend(divert_to=server.port)
        fetcher = _fetcher(["*.example.com"], resolver, LocalTransport(backend, trust))
        assert await fetcher.fetch(url) == b"\x89PNG image"
    assert len(resolver.calls) == 1 and resolver.calls[0][0] == "img.example.com"
    assert backend.connects == [connect]
    assert server.connections == 1 and server.sni == ["img.example.com"]
    assert server.requests == [(host, path)]


async def test_next_checked_address_when_one_refuses_the_connection(tmp_path):
    tls, trust = _certificates(tmp_path, x509.DNSName("img.example.com"))
    resolver = Rebinding([PUBLIC, "2606:4700:4700::1111"], ["127.0.0.1"])
    with ImageServer(b"\x89PNG image", tls) as server:
        backend = LocalOnlyBackend(divert_to=server.port, unreachable=(PUBLIC,))
        fetcher = _fetcher(["img.example.com"], resolver, LocalTransport(backend, trust))
        assert await fetcher.fetch("https://img.example.com/cat.png") == b"\x89PNG image"
    assert len(resolver.calls) == 1
    assert backend.connects == [(PUBLIC, 443), ("2606:4700:4700::1111", 443)]
    assert server.requests == [("img.example.com", "/cat.png")]


@pytest.mark.parametrize(
    "san", [x509.DNSName("other.example.org"), x509.IPAddress(ipaddress.ip_address(PUBLIC))]
)
async def test_certificate_must_name_the_original_host(tmp_path, san):
    """A certificate for another name, or for the address connected to, is refused."""
    tls, trust = _certificates(tmp_path, san)
    with ImageServer(b"\x89PNG image", tls) as server:
        backend = LocalOnlyBackend(divert_to=server.port)
        fetcher = _fetcher(["img.example.com"], Rebinding([PUBLIC], [PUBLIC]), LocalTransport(backend, trust))
        with pytest.raises(InvalidArgument) as err:
            await fetcher.fetch("https://img.example.com/cat.png")
    assert err.value.reason == "image_fetch_failed"
    assert backend.connects == [(PUBLIC, 443)] and server.requests == []


@pytest.mark.parametrize(
    "answer",
    [
        ["127.0.0.1"],
        [PUBLIC, "127.0.0.1"],
        ["64:ff9b::7f00:1"],  # NAT64 of loopback
        ["64:ff9b::a9fe:a9fe"],  # NAT64 of the cloud metadata address
        ["64:ff9b::a00:1"],  # NAT64 of 10.0.0.1
        ["64:ff9b:1::a00:1"],  # local-use NAT64 prefix
        ["2002:7f00:1::"],  # 6to4 of loopback
        ["2002:a9fe:a9fe::1"],  # 6to4 of link-local
        ["2001:0:4136:e378:8000:63bf:3fff:fdd2"],  # Teredo
        ["::127.0.0.1"],  # IPv4-compatible loopback
        ["::a9fe:a9fe"],  # IPv4-compatible metadata
        ["::ffff:10.0.0.1"],  # IPv4-mapped private
        ["::ffff:0:7f00:1"],  # IPv4-translated loopback
        [PUBLIC, "64:ff9b::7f00:1"],
    ],
)
async def test_non_public_answers_refused_before_any_connection(answer):
    """A resolver answer that is, or embeds, a non-public address: ``image_host_not_public``, and neither
    the transport nor the local server sees a connection."""
    backend = LocalOnlyBackend()
    with ImageServer(SECRET) as server:
        fetcher = _fetcher(["img.example.com"], Rebinding(answer, answer), LocalTransport(backend))
        with pytest.raises(InvalidArgument) as err:
            await fetcher.fetch(f"http://img.example.com:{server.port}/x.png")
    assert err.value.reason == "image_host_not_public"
    assert backend.connects == [] and server.connections == 0


@pytest.mark.parametrize(
    "url",
    [
        "https://img.example.com:99999/x.png",
        "https://img.example.com:65536/x.png",
        "https://img.example.com:abc/x.png",
        "https://img.example.com:-1/x.png",
        "https://img.example.com:0/x.png",
        "https://[::1/x.png",
        "https://img.example.com/x\x00.png",
        "https://img%2eexample.com/x.png",
    ],
)
async def test_malformed_urls_are_invalid_and_never_resolved(url):
    resolver = Rebinding([PUBLIC], [PUBLIC])
    backend = LocalOnlyBackend()
    fetcher = _fetcher(["img.example.com", "*.example.com", "::1"], resolver, LocalTransport(backend))
    with pytest.raises(InvalidArgument) as err:
        await fetcher.fetch(url)
    assert err.value.reason == "image_url_invalid"
    assert resolver.calls == [] and backend.connects == []


async def test_a_compressed_body_is_refused_before_it_is_inflated():
    """A gzip bomb (8 KiB on the wire, 64 MiB inflated) from a server that ignores the fetcher's
    ``Accept-Encoding: identity``: refused from its headers, nothing inflated."""
    import gzip

    bomb = gzip.compress(b"\0" * (64 << 20))
    resolver = Rebinding([PUBLIC], ["127.0.0.1"])
    with ImageServer(bomb, headers={"Content-Encoding": "gzip"}) as server:
        backend = LocalOnlyBackend(divert_to=server.port)
        fetcher = _fetcher(["img.example.com"], resolver, LocalTransport(backend))
        with pytest.raises(InvalidArgument) as err:
            await fetcher.fetch("http://img.example.com/bomb.png")
    assert err.value.reason == "image_fetch_failed" and "gzip" in err.value.message
    assert server.accept_encoding == ["identity"]
