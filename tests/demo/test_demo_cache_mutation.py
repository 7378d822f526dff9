"""The mesh in process (real preprocess, encoder with its embedding cache, decoder, gateway over HTTP
with the official openai client): the demo model answers as ``generate`` does, and when the cache
returns another image's entry, the answers follow that image and accuracy drops below 50%."""

import asyncio
import hashlib

import openai
import pytest

from gateway.tenancy.keys import DEFAULT_TENANT
from services.common.refs import embedding_key
from services.common.types import TilingParams
from services.demo import DEMO_MODEL_NAME
from services.demo.evaluate import accuracy, swap_partners
from services.demo.task import QUESTION_TYPES
from tests.demo.helpers import ask
from tests.support.gateway import UvicornThread, local_cores, make_gateway

PER_TYPE = 10


@pytest.fixture(scope="module")
def mesh(demo_path):
    from gateway.http_api import create_http_app
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter

    # Without the KV prefix cache: with it, the second pass's prompts (the same images, the same
    # questions) would reuse the first pass's image KV and never read the embedding entries at all.
    with local_cores(demo_path, cache={"enable_prefix_caching": False}) as cores:
        gateway = make_gateway(cores, KeyStore(None), LocalLimiter(), model=DEMO_MODEL_NAME)
        with UvicornThread(create_http_app(gateway)) as server:
            client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
            yield {"client": client, **cores}


def test_wrong_cache_entry_breaks_every_question_type(mesh, heldout_set, generate_answers):
    samples, pixels = heldout_set
    idx = [i for q in QUESTION_TYPES for i in [j for j, s in enumerate(samples) if s.qtype == q][:PER_TYPE]]
    chosen = [samples[i] for i in idx]
    pngs = [s.png() for s in chosen]
    partners = swap_partners(chosen, [pixels[i] for i in idx])

    # the mesh answers as generate does (and fills the cache)
    first = [ask(mesh["client"], png, s.question) for png, s in zip(pngs, chosen, strict=True)]
    assert first == [generate_answers[i] for i in idx]

    # poison: under each image's key, its partner's entry (valid, CRC-checked, just not this image's)
    encoder = mesh["encoder"]
    tiling = TilingParams(max_num=12)

    def key(png: bytes) -> str:
        return embedding_key(DEFAULT_TENANT, encoder.identity, tiling, hashlib.sha256(png).hexdigest())

    async def poison():
        entries = [await encoder.store.get(key(png)) for png in pngs]
        assert all(e is not None for e in entries), "the first pass filled the cache"
        for png, j in zip(pngs, partners, strict=True):
            await encoder.store.put(key(png), entries[j])

    asyncio.run(poison())
    hits = encoder.stats.hits_lru
    got = [ask(mesh["client"], png, s.question) for png, s in zip(pngs, chosen, strict=True)]
    assert encoder.stats.hits_lru == hits + len(chosen), "every answer came from the (poisoned) cache"
    acc = accuracy(chosen, got)
    for qtype in QUESTION_TYPES:
        assert acc[qtype] < 0.5, acc
