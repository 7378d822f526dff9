"""The mesh-level ``redis`` and ``cache`` settings become the stores' settings, field by field, and
reach the Redis client the store builds."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.common.config import CommonConfig, EmbeddingCacheConfig, RedisConfig
from services.embedding_cache.config import LruConfig, lru_config, shared_store_config
from services.embedding_cache.redis_store import RedisEmbeddingStore
from tests.embedding_cache.helpers import REDIS_URL, RUN_PREFIX


def mesh(**cache) -> CommonConfig:
    return CommonConfig(
        redis=RedisConfig(url=REDIS_URL, key_prefix=RUN_PREFIX, socket_timeout_s=0.7, max_connections=5),
        cache=EmbeddingCacheConfig(ttl_s=77.0, max_entry_bytes=3 << 20, **cache),
    )


def test_mesh_settings_become_the_shared_store_settings():
    cfg = shared_store_config(mesh(), REDIS_URL)
    assert cfg is not None and cfg.url == REDIS_URL
    assert cfg.key_prefix == RUN_PREFIX
    assert cfg.op_timeout_s == 0.7
    assert cfg.max_connections == 5
    assert cfg.ttl_s == 77.0
    assert cfg.max_entry_bytes == 3 << 20
    assert shared_store_config(mesh(), "") is None  # no Redis: no shared store


async def test_the_store_builds_its_client_from_them():
    store = RedisEmbeddingStore(shared_store_config(mesh(), REDIS_URL))
    try:
        pool = store.client.connection_pool
        assert pool.max_connections == 5
        assert pool.connection_kwargs["socket_timeout"] == 0.7
        assert store.max_entry_bytes == 3 << 20 and store.default_ttl_s == 77.0
    finally:
        await store.close()


def test_local_lru_bytes_sizes_the_lru_and_zero_turns_it_off():
    assert lru_config(mesh(local_lru_bytes=123_456).cache) == LruConfig(max_bytes=123_456)
    assert lru_config(mesh(local_lru_bytes=0).cache) == LruConfig(enabled=False)


def test_mesh_bounds_match_the_stores():
    with pytest.raises(ValidationError):
        EmbeddingCacheConfig(max_entry_bytes=(1 << 30) + 1)  # the store takes at most 1 GiB
    with pytest.raises(ValidationError):
        RedisConfig(key_prefix="has:colon")  # the prefix is one segment of the key
