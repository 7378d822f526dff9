"""Fetching remote images, when a deployment enables it: allow-listed hosts only, public addresses
only, bounded in bytes and time.

Off by default (``gateway.allow_remote_images``): a server that fetches URLs for its callers is a
server-side request forgery risk. When enabled, a URL is fetched only if its host matches the
allow-list (``images.example.com`` or ``*.example.com``), its scheme is http(s), and every address the
host resolves to is a global unicast address (never loopback, private, link-local, reserved or
multicast: no cloud metadata endpoint, no cluster-internal service). Redirects are not followed. The
body is read in chunks and abandoned past ``max_bytes``; the whole fetch has one deadline.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import httpx

from services.common.errors import InvalidArgument

Resolver = Callable[[str, int], Awaitable[list[str]]]


async def resolve_host(host: str, port: int) -> list[str]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def host_allowed(host: str, allow: Sequence[str]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in allow:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and host != pattern[2:]:
            return True
        if host == pattern:
            return True
    return False


def public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


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
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InvalidArgument("image URLs must be http(s) with a host", reason="image_url_invalid")
        if parts.username or parts.password:
            raise InvalidArgument("image URLs must not carry credentials", reason="image_url_invalid")
        host = parts.hostname
        if not host_allowed(host, self.allow_hosts):
            raise InvalidArgument(
                f"image host {host!r} is not in the allow-list", reason="image_host_not_allowed"
            )
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            async with asyncio.timeout(self.timeout_s):
                addresses = await self.resolver(host, port)
                if not addresses or not all(public_address(a) for a in addresses):
                    raise InvalidArgument(
                        f"image host {host!r} resolves to a non-public address",
                        reason="image_host_not_public",
                    )
                return await self._download(url)
        except TimeoutError:
            raise InvalidArgument(
                f"fetching the image took longer than {self.timeout_s:g} s", reason="image_fetch_timeout"
            ) from None
        except (httpx.HTTPError, OSError) as exc:
            raise InvalidArgument(
                f"cannot fetch the image: {type(exc).__name__}", reason="image_fetch_failed"
            ) from None

    async def _download(self, url: str) -> bytes:
        async with httpx.AsyncClient(transport=self.transport, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidArgument(
                        f"the image URL answered HTTP {response.status_code}", reason="image_fetch_failed"
                    )
                declared = response.headers.get("content-length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    raise InvalidArgument(
                        f"image is larger than {self.max_bytes} bytes", reason="image_too_large"
                    )
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise InvalidArgument(
                            f"image is larger than {self.max_bytes} bytes", reason="image_too_large"
                        )
                    chunks.append(chunk)
                return b"".join(chunks)
