"""The embedding store in Redis: shared by every encoder and decoder replica, surviving restarts.

Layout of one entry under its content address ``K`` (``services.common.refs.embedding_key``):

- ``K:t0`` .. ``K:t{n-1}``: one value per tile, the raw little-endian bytes of a (256, D) tensor;
- ``K``: the manifest (JSON: dtype, tile shape, tile count, CRC32 of every tile), written last;
- ``K:lock``: the cross-replica fill lock (``SET NX PX``, released by compare-and-delete in Lua).

Why one value per tile: Redis runs one command at a time, so a single 24 MB value would stall every
other client while it is copied; per-tile values interleave with other traffic. Reads and writes are
pipelined (one round trip for all tiles), not wrapped in MULTI, for the same reason. A reader trusts
nothing it has not verified: a missing tile, a wrong length or a CRC mismatch (a crash mid-write, an
eviction of one tile, a concurrent overwrite) makes the entry a miss.

Failure is not an error for the caller's request: every operation is bounded by ``op_timeout_s`` and
guarded by a circuit breaker, and raises ``StoreUnavailable`` (Redis down, slow or open breaker) or
``StoreFull`` (Redis answers OOM to writes); the encoder then answers without the cache.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import BusyLoadingError, OutOfMemoryError, ReadOnlyError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.embedding_cache.circuit_breaker import CircuitBreaker
from services.embedding_cache.config import RedisStoreConfig
from services.embedding_cache.errors import StoreFull, StoreUnavailable
from services.embedding_cache.store import EmbeddingStore, StoredEmbedding, parse_manifest, verify_tiles

log = logging.getLogger(__name__)

T = TypeVar("T")

# Deletes the lock only if it still holds our token: an expired lock may already be someone else's.
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

Observer = Callable[[str], None]


def tile_key(key: str, index: int) -> str:
    return f"{key}:t{index}"


def lock_key(key: str) -> str:
    return f"{key}:lock"


class RedisEmbeddingStore(EmbeddingStore):
    """``EmbeddingStore`` on redis.asyncio with a connection pool, timeouts and a circuit breaker.

    ``observer`` (optional) is called with an event name for metrics: ``hit``, ``miss``, ``corrupt``,
    ``error``, ``timeout``, ``oom``, ``breaker_open``, ``breaker_closed``, ``skipped``.
    """

    def __init__(
        self,
        config: RedisStoreConfig,
        *,
        client: aioredis.Redis | None = None,
        observer: Observer | None = None,
    ):
        self.config = config
        self.max_entry_bytes = config.max_entry_bytes
        self.default_ttl_s = config.ttl_s
        if client is None:
            pool = aioredis.ConnectionPool.from_url(
                config.url,
                max_connections=config.max_connections,
                socket_timeout=config.op_timeout_s,
                socket_connect_timeout=config.connect_timeout_s,
                # No hidden retries: the breaker decides when to try again, and a request never waits
                # for more than one bounded attempt.
                retry=Retry(NoBackoff(), 0),
            )
            client = aioredis.Redis(connection_pool=pool)
            self._owns_client = True
        else:
            self._owns_client = False
        self.client = client
        self._observer = observer
        self.breaker = CircuitBreaker(config.failure_threshold, config.reprobe_interval_s)
        # Writes refused with OOM: Redis is up but full. Skip writes for a while; reads go on.
        self.full_breaker = CircuitBreaker(1, config.reprobe_interval_s)
        self._release_script = self.client.register_script(_RELEASE_LOCK)

    # -- guarded execution --------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        """False while the breaker is open (no I/O)."""
        return not self.breaker.is_open

    def _emit(self, event: str) -> None:
        if self._observer is not None:
            self._observer(event)

    async def _guard(self, op: str, fn: Callable[[], Awaitable[T]], *, write: bool = False) -> T:
        if not self.breaker.allow():
            self._emit("skipped")
            raise StoreUnavailable(f"redis {op} skipped: circuit open ({self.breaker.last_error})")
        probe = self.breaker.is_open  # let through while open: this call is the probe
        full_probe = False
        try:
            if write:
                if not self.full_breaker.allow():
                    self._emit("skipped")
                    raise StoreFull(f"redis {op} skipped: redis reported out of memory")
                full_probe = self.full_breaker.is_open
            return await self._attempt(op, fn, write)
        finally:
            # A probe that ended without an answer (cancelled, or a bug of ours) lets the next call probe.
            if probe:
                self.breaker.end_probe()
            if full_probe:
                self.full_breaker.end_probe()

    async def _attempt(self, op: str, fn: Callable[[], Awaitable[T]], write: bool) -> T:
        try:
            async with asyncio.timeout(self.config.op_timeout_s):
                result = await fn()
        except OutOfMemoryError as exc:
            self._succeeded()  # Redis answered: it is up, only full
            self.full_breaker.record_failure(str(exc))
            self._emit("oom")
            log.warning("redis %s refused, out of memory: %s", op, exc)
            raise StoreFull(f"redis {op}: out of memory") from exc
        except (TimeoutError, RedisError, OSError) as exc:
            if isinstance(exc, RedisError) and not _is_unavailability(exc):
                raise
            self._emit("timeout" if isinstance(exc, TimeoutError) else "error")
            reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            if self.breaker.record_failure(reason):
                self._emit("breaker_open")
                log.warning("redis unavailable, circuit opened (%s); answering without the cache", reason)
            raise StoreUnavailable(f"redis {op} failed: {reason}") from exc
        self._succeeded()
        if write:
            self.full_breaker.record_success()
        return result

    def _succeeded(self) -> None:
        if self.breaker.record_success():
            self._emit("breaker_closed")
            log.warning("redis is back, circuit closed; caching resumes")

    # -- EmbeddingStore -----------------------------------------------------------------------------
    async def get(self, key: str) -> StoredEmbedding | None:
        async def read() -> StoredEmbedding | None:
            raw = await self.client.get(key)
            if raw is None:
                self._emit("miss")
                return None
            manifest = parse_manifest(raw)
            if manifest is None:
                self._emit("corrupt")
                return None
            pipe = self.client.pipeline(transaction=False)
            for i in range(manifest["tiles"]):
                pipe.get(tile_key(key, i))
            blobs = await pipe.execute()
            entry = verify_tiles(manifest, blobs)
            self._emit("hit" if entry is not None else "corrupt")
            return entry

        return await self._guard("get", read)

    async def put(self, key: str, entry: StoredEmbedding, ttl_s: float | None = None) -> bool:
        if entry.nbytes > self.max_entry_bytes:
            return False
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        if ttl <= 0:
            raise ValueError("ttl_s must be positive")
        px = max(1, int(ttl * 1000))
        manifest = _dumps(entry.manifest())

        async def write() -> bool:
            pipe = self.client.pipeline(transaction=False)
            for i, tile in enumerate(entry.tiles):
                pipe.set(tile_key(key, i), tile.data, px=px)
            pipe.set(key, manifest, px=px)  # last: readers see the entry only once its tiles exist
            await pipe.execute()
            return True

        return await self._guard("put", write, write=True)

    async def delete(self, key: str) -> None:
        async def drop() -> None:
            manifest = parse_manifest(await self.client.get(key) or b"")
            tiles = manifest["tiles"] if manifest else 0
            await self.client.delete(key, *(tile_key(key, i) for i in range(tiles)))

        await self._guard("delete", drop)

    async def contains(self, key: str) -> bool:
        """Manifest present and every tile present (lengths and checksums are checked by ``get`` only)."""

        async def probe() -> bool:
            manifest = parse_manifest(await self.client.get(key) or b"")
            if manifest is None:
                return False
            n = manifest["tiles"]
            return int(await self.client.exists(*(tile_key(key, i) for i in range(n)))) == n

        return await self._guard("contains", probe)

    async def acquire_fill_lock(self, key: str, ttl_s: float) -> str | None:
        token = secrets.token_hex(16)
        px = max(1, int(ttl_s * 1000))

        async def acquire() -> Any:
            return await self.client.set(lock_key(key), token, nx=True, px=px)

        return token if await self._guard("lock", acquire, write=False) else None

    async def release_fill_lock(self, key: str, token: str) -> None:
        async def release() -> Any:
            return await self._release_script(keys=[lock_key(key)], args=[token])

        await self._guard("unlock", release)

    async def healthy(self) -> bool:
        try:
            return bool(await self._guard("ping", self.client.ping))
        except StoreUnavailable:
            return False

    async def close(self) -> None:
        if self._owns_client:
            await self.client.aclose()


def _is_unavailability(exc: RedisError) -> bool:
    """Errors that mean Redis cannot serve now (as opposed to a bug in our command)."""
    return isinstance(
        exc, (RedisConnectionError, RedisTimeoutError, BusyLoadingError, ReadOnlyError)
    ) or "MISCONF" in str(exc)


def _dumps(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, separators=(",", ":")).encode()
