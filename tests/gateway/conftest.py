"""The gateway in process: real encoder core (in-process preprocess, no Redis), real decoder core,
served over loopback HTTP by uvicorn; gateways of one module share the cores."""

from __future__ import annotations

import pytest

from tests.support.gateway import UvicornThread, local_cores

MODEL = "tiny"


@pytest.fixture(scope="module")
def cores(tiny_checkpoint):
    """Real encoder (in-process preprocess, LRU only) and decoder cores."""
    with local_cores(tiny_checkpoint) as built:
        yield built


def make_gateway(cores, keys, limiter, model: str = MODEL, **limits):
    from gateway.core import Gateway, GatewayLimits, ModelRoute
    from mesh.local_clients import LocalDecoderClient, LocalEncoderClient

    route = ModelRoute(
        model,
        LocalEncoderClient(cores["encoder"]),
        LocalDecoderClient(cores["frontend"]),
        12,
        cores["decoder"].max_model_len,
    )
    return Gateway([route], keys, limiter, GatewayLimits(**limits))


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
