"""Fetching remote images, when a deployment enables it: allow-listed hosts only, public addresses
only, one resolution, bounded in bytes and time.

Off by default (``gateway.allow_remote_images``): a server that fetches URLs for its callers is a
server-side request forgery risk. When enabled, a URL is fetched only if

- it is an http(s) URL with a host, no credentials and, if it names a port, one in 1..65535; any other
  URL (a port of ``99999`` or ``abc``, an unclosed ``[``, a control character) is ``image_url_invalid``;
- its host matches the allow-list (``images.example.com`` or ``*.example.com``, compared in ASCII
  (IDNA) form): else ``image_host_not_allowed``;
- the host, resolved once, has at least one address and every address is public (``public_address``):
  else ``image_host_not_public``.

The connection then goes to a checked address itself, never to the name: the request is
``scheme://<address>:<port>/path?query`` (IPv6 bracketed) with ``Host`` set to the original host (with
its port when that is not the scheme's default) and, for https, the TLS SNI and the certificate's
hostname check made against the original host name. A name that answers a public address when checked
and 127.0.0.1 a moment later (DNS rebinding) still reaches only the public address. The addresses are
tried in the resolver's order, the next only when one refuses the connection. Proxies from the
environment are not used. Redirects are not followed. The body is read in chunks and abandoned past
``max_bytes``; resolution and download share one deadline.

Public means a global unicast address, and for IPv6 only inside 2000::/3 (IANA's global unicast
space), with two exceptions that embed an IPv4 address the packets really go to: IPv4-mapped
``::ffff:a.b.c.d`` (a socket connects to ``a.b.c.d``) and NAT64's well-known prefix
``64:ff9b::a.b.c.d`` (RFC 6052 fixes the IPv4 address in the last 32 bits, and the translator sends to
it; IPv6-only clusters with DNS64 reach every IPv4-only host that way). Both are decoded and the IPv4
rule applied to the embedded address: ``64:ff9b::7f00:1`` is loopback, ``64:ff9b::a9fe:a9fe`` the cloud
metadata address. Refused outright, whatever they embed: IPv4-compatible ``::a.b.c.d`` (deprecated),
IPv4-translated ``::ffff:0:a.b.c.d``, NAT64's local-use ``64:ff9b:1::/48`` (the operator chooses where
the IPv4 address sits), 6to4 ``2002::/16`` and Teredo ``2001::/32`` (the embedded IPv4 address is a
relay or a router, not the destination, and both are deprecated for this use), and documentation
``3fff::/20``. Python's ``ipaddress.is_global`` alone answers True for most of these.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from services.common.errors import InvalidArgument

Resolver = Callable[[str, int], Awaitable[list[str]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_PORTS = {"http": 80, "https": 443}
_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NEVER_PUBLIC_V6 = (
    ipaddress.ip_network("2001::/32"),  # Teredo
    ipaddress.ip_network("2002::/16"),  # 6to4
    ipaddress.ip_network("3fff::/20"),  # documentation (RFC 9637)
)


async def resolve_host(host: str, port: int) -> list[str]:
    """The host's addresses, in the system resolver's order of preference, each once."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def _ascii(name: str) -> str:
    """``name`` lower-cased, in ASCII (IDNA) form; UnicodeError (a ValueError) when it has none."""
    name = name.lower()
    return name if name.isascii() else name.encode("idna").decode("ascii")


def host_allowed(host: str, allow: Sequence[str]) -> bool:
    host = _ascii(host).rstrip(".")
    for pattern in allow:
        try:
            pattern = _ascii(pattern).rstrip(".")
        except UnicodeError:
            continue
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and host != pattern[2:]:
            return True
        if host == pattern:
            return True
    return False


def connect_address(address: str) -> IPAddress | None:
    """The address to connect to for a resolved ``address`` if it is public (see the module's
    docstring), else None. An IPv4-mapped address is answered as its IPv4 address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
            return ip if connect_address(str(embedded)) is not None else None
        elif ip not in _GLOBAL_UNICAST or any(ip in net for net in _NEVER_PUBLIC_V6):
            return None
    return ip if ip.is_global and not ip.is_multicast else None


def public_address(address: str) -> bool:
    return connect_address(address) is not None


@dataclass(frozen=True)
class ImageURL:
    """An image URL taken apart once: the host that is checked and named, and what the request to a
    checked address is built from."""

    scheme: str  # http or https
    host: str  # lower case, ASCII (IDNA), no brackets
    port: int
    target: str  # path and query, at least "/"

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"

    def at(self, address: IPAddress) -> httpx.URL:
        literal = f"[{address}]" if address.version == 6 else str(address)
        return httpx.URL(f"{self.scheme}://{literal}:{self.port}{self.target}")


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="image_url_invalid")


def parse_image_url(url: str) -> ImageURL:
    """The URL's parts, or InvalidArgument ``image_url_invalid`` for anything that is not a plain
    http(s) URL with a host and a valid port."""
    try:
        parts = urlsplit(url)
        port, hostname = parts.port, parts.hostname
        host = _ascii(hostname) if hostname else ""
    except ValueError as exc:  # a port out of range or not a number, an unclosed "[", a bad IDN
        raise _invalid(f"image URL cannot be parsed: {exc}") from None
    if parts.scheme not in DEFAULT_PORTS or not host:
        raise _invalid("image URLs must be http(s) with a host")
    if parts.username is not None or parts.password is not None:
        raise _invalid("image URLs must not carry credentials")
    if port == 0:
        raise _invalid("image URL ports must be in 1..65535")
    if not _NAME.fullmatch(host) and not _is_ip_literal(host):
        raise _invalid(f"image URL host {host!r} is not a host name or an IP address")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    image_url = ImageURL(parts.scheme, host, port or DEFAULT_PORTS[parts.scheme], target)
    try:  # the request URL must build (no control characters in the path) before anything is resolved
        image_url.at(ipaddress.IPv4Address("192.0.2.1"))
    except httpx.InvalidURL as exc:
        raise _invalid(f"image URL cannot be parsed: {exc}") from None
    return image_url


class RemoteImageFetcher:
    def __init__(
        self,
        allow_hosts: Sequence[str],
        *,
        max_bytes: int,
        timeout_s: float,
        resolver: Resolver = resolve_host,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        if not allow_hosts:
            raise InvalidArgument("remote images need an allow-list of hosts")
        self.allow_hosts = list(allow_hosts)
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.resolver = resolver
        self.transport = transport

    async def fetch(self, url: str) -> bytes:
        image_url = parse_image_url(url)
        if not host_allowed(image_url.host, self.allow_hosts):
            raise InvalidArgument(
                f"image host {image_url.host!r} is not in the allow-list", reason="image_host_not_allowed"
            )
        try:
            async with asyncio.timeout(self.timeout_s):
                addresses = await self._checked_addresses(image_url)
                for address in addresses[:-1]:
                    try:
                        return await self._download(image_url, address)
                    except httpx.ConnectError:
                        continue
                return await self._download(image_url, addresses[-1])
        except TimeoutError:
            raise InvalidArgument(
                f"fetching the image took longer than {self.timeout_s:g} s", reason="image_fetch_timeout"
            ) from None
        except (httpx.HTTPError, OSError) as exc:
            raise InvalidArgument(
                f"cannot fetch the image: {type(exc).__name__}", reason="image_fetch_failed"
            ) from None

    async def _checked_addresses(self, image_url: ImageURL) -> list[IPAddress]:
        """The host resolved once; every answer public, or InvalidArgument ``image_host_not_public``."""
        addresses = [connect_address(a) for a in await self.resolver(image_url.host, image_url.port)]
        checked = [a for a in addresses if a is not None]
        if not addresses or len(checked) != len(addresses):
            raise InvalidArgument(
                f"image host {image_url.host!r} resolves to a non-public address",
                reason="image_host_not_public",
            )
        return list(dict.fromkeys(checked))

    async def _download(self, image_url: ImageURL, address: IPAddress) -> bytes:
        """GET the image from ``address`` itself, naming the original host in ``Host`` and, for https,
        in the SNI and the certificate check."""
        extensions = {"sni_hostname": image_url.host.rstrip(".")} if image_url.scheme == "https" else {}
        transport = self.transport or httpx.AsyncHTTPTransport()
        async with httpx.AsyncClient(transport=transport, follow_redirects=False, trust_env=False) as client:
            request = client.build_request(
                "GET",
                image_url.at(address),
                headers={"Host": image_url.host_header, "Accept-Encoding": "identity"},
                extensions=extensions,
            )
            response = await client.send(request, stream=True)
            try:
                return await self._body(response)
            finally:
                await response.aclose()

    async def _body(self, response: httpx.Response) -> bytes:
        if response.status_code != 200:
            raise InvalidArgument(
                f"the image URL answered HTTP {response.status_code}", reason="image_fetch_failed"
            )
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding != "identity":
            # Counting inflated bytes would inflate first: a small body can be a huge one.
            raise InvalidArgument(
                f"the image URL answered a {encoding[:32]}-encoded body; images are fetched unencoded",
                reason="image_fetch_failed",
            )
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise InvalidArgument(f"image is larger than {self.max_bytes} bytes", reason="image_too_large")
        chunks, size = [], 0
        async for chunk in response.aiter_bytes():  # identity only: nothing is inflated
            size += len(chunk)
            if size > self.max_bytes:
                raise InvalidArgument(
                    f"image is larger than {self.max_bytes} bytes", reason="image_too_large"
                )
            chunks.append(chunk)
        return b"".join(chunks)
