"""The mesh-level ``redis`` and ``cache`` settings reach an encoder replica's stores (built the way
Serve builds the replica, without Ray: no preprocess application, nothing encoded)."""

from __future__ import annotations

from services.common.config import CommonConfig, EmbeddingCacheConfig, ModelConfig, RedisConfig, TracingConfig
from services.encoder.config import EncoderAppArgs
from services.encoder.deployment import EncoderDeployment
from tests.encoder.helpers import REDIS_URL, RUN_NS


def replica(tiny_checkpoint, **cache) -> EncoderDeployment:
    common = CommonConfig(
        redis=RedisConfig(url=REDIS_URL, key_prefix=RUN_NS, socket_timeout_s=0.7, max_connections=5),
        cache=EmbeddingCacheConfig(ttl_s=77.0, max_entry_bytes=3 << 20, **cache),
        tracing=TracingConfig(enabled=False),
    )
    model = ModelConfig(name="tiny", path=str(tiny_checkpoint), device="cpu")
    return EncoderDeployment(EncoderAppArgs(model=model, common=common, preprocess_app=None))


async def test_mesh_settings_reach_the_replicas_stores(tiny_checkpoint):
    deployment = replica(tiny_checkpoint, local_lru_bytes=123_456)
    core = deployment.core
    try:
        assert core.key_prefix == RUN_NS
        shared = core.shared
        assert shared is not None
        assert shared.client.connection_pool.max_connections == 5
        assert shared.config.op_timeout_s == 0.7
        assert shared.default_ttl_s == 77.0 and shared.max_entry_bytes == 3 << 20
        assert core.store.front is not None and core.store.front.max_bytes == 123_456
    finally:
        await core.close()


async def test_zero_local_lru_bytes_turns_the_lru_off(tiny_checkpoint):
    core = replica(tiny_checkpoint, local_lru_bytes=0).core
    try:
        assert core.store.front is None and core.shared is not None
    finally:
        await core.close()
