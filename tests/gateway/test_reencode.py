"""The gateway's second attempt: when the decoder cannot read the references the encoder gave (a cache
entry gone, or a cache the decoder cannot reach while the encoder can), the gateway asks the encoder
again for the tensors themselves, and the request succeeds with the same answer. Real cores, a real
Redis for the encoder, a closed port for the decoder, the official client over HTTP."""

import base64

import openai
import pytest
import redis

from tests.support.gateway import MODEL, UvicornThread, local_encoder, make_gateway, reference_answer
from tests.support.images import png
from tests.support.own_redis import OwnRedis
from tests.support.ports import free_port
from tests.support.signing import SIGNER


@pytest.fixture(scope="module")
def split_cache_gateway(cores, tiny_checkpoint):
    from gateway.http_api import create_http_app
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter
    from services.decoder.server import DecoderFrontend
    from services.embedding_cache.config import RedisStoreConfig
    from services.embedding_cache.redis_store import RedisEmbeddingStore
    from services.embedding_cache.resolver import EmbeddingResolver

    own = OwnRedis().start()
    unreachable = RedisEmbeddingStore(RedisStoreConfig(url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        with local_encoder(tiny_checkpoint, redis=RedisStoreConfig(url=own.url)) as encoder:
            split = {
                "encoder": encoder,
                "decoder": cores["decoder"],
                "frontend": DecoderFrontend(cores["decoder"], EmbeddingResolver(unreachable), SIGNER),
            }
            gateway = make_gateway(split, KeyStore(None), LocalLimiter())
            with UvicornThread(create_http_app(gateway)) as server:
                yield {"server": server, "encoder": encoder, "redis": own}
    finally:
        own.kill()


def test_unreadable_references_are_answered_with_tensors(split_cache_gateway, reference_model):
    model, tokenizer = reference_model
    client = openai.OpenAI(base_url=split_cache_gateway["server"].base_url, api_key="unused", max_retries=0)
    img = png(700, 350, seed=31)
    uri = "data:image/png;base64," + base64.b64encode(img).decode()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": uri}}, {"type": "text", "text": "What?"}],
        }
    ]
    want = reference_answer(
        model, tokenizer, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}],
        [img], 12, 6,
    )  # fmt: skip
    for _ in range(2):  # a miss (encoded, written to Redis), then a cache hit: both re-asked
        got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        assert got.choices[0].message.content == want
    stats = split_cache_gateway["encoder"].stats
    assert stats.encodes == 1 and stats.shared_writes == 1
    assert stats.hits_lru + stats.hits_shared == 3  # the re-asks and the second request's first ask
    assert redis.Redis(port=split_cache_gateway["redis"].port).dbsize() > 0
