"""The gateway in process: real encoder core (in-process preprocess, no Redis), real decoder core
(the suite-wide ``cores`` fixture), served over loopback HTTP by uvicorn."""

from __future__ import annotations

import pytest

from tests.support.gateway import UvicornThread, make_gateway


@pytest.fixture(scope="module")
def inprocess_gateway(cores):
    from gateway.http_api import create_http_app
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter

    gateway = make_gateway(cores, KeyStore(None), LocalLimiter())
    with UvicornThread(create_http_app(gateway)) as server:
        yield {"server": server, "gateway": gateway, **cores}


@pytest.fixture(scope="module")
def reference_model(tiny_checkpoint):
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    model = InternVLForConditionalGeneration.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    return model, tokenizer
