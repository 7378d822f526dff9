"""A converted original-format checkpoint is served by the mesh: the in-process gateway (real
encoder and decoder cores over HTTP, the official openai client) answers exactly what the original
InternVLChatModel computes with chat()'s prompt — InternLM2 LLM, InternViT-6B-style tower, ps_version v1."""

import base64
import dataclasses
import json

import numpy as np
import openai
import pytest
import torch

from services.demo.reference import reference_load_image
from tests.convert.builders import VIT_6B, build_original_checkpoint
from tests.convert.reference import expand_images, reference_chat_prompt
from tests.support.gateway import UvicornThread
from tests.support.images import png
from tests.support.signing import SIGNER

MODEL = "converted"


@pytest.fixture(scope="module")
def served_converted(tmp_path_factory):
    from gateway.core import Gateway, ModelRoute
    from gateway.http_api import create_http_app
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter
    from mesh.local_clients import LocalDecoderClient, LocalEncoderClient
    from services.convert.converter import convert_checkpoint
    from services.decoder.config import DecoderConfig
    from services.decoder.engine.async_engine import DecoderCore
    from services.decoder.server import DecoderFrontend
    from services.embedding_cache.resolver import EmbeddingResolver
    from services.encoder.config import EncoderConfig
    from services.encoder.core import EncoderCore, PreprocessorTileSource
    from services.preprocess.pipeline import Preprocessor

    root = tmp_path_factory.mktemp("served-converted")
    vit = dataclasses.replace(VIT_6B, image_size=448)  # real 448-pixel tiles, 256 tokens each
    original = build_original_checkpoint(root / "original", vit=vit, ps_version="v1", seed=2)
    # Room for three 256-token tiles: the tiny InternLM2 declares 256 positions, and plain RoPE does
    # not depend on that number, so raising it changes no weight and no output.
    config_path = original.path / "config.json"
    config = json.loads(config_path.read_text())
    config["llm_config"]["max_position_embeddings"] = 2048
    config_path.write_text(json.dumps(config))
    report = convert_checkpoint(original.path, root / "native", progress=False)
    preprocessor = Preprocessor()
    encoder = EncoderCore.from_config(
        EncoderConfig(checkpoint=str(report.dst), dtype="float32", fallback="inline"),
        tile_source=PreprocessorTileSource(preprocessor),
    )
    decoder = DecoderCore(DecoderConfig(model=str(report.dst), dtype="float32"))
    route = ModelRoute(
        MODEL,
        LocalEncoderClient(encoder),
        LocalDecoderClient(DecoderFrontend(decoder, EmbeddingResolver(None), SIGNER)),
        12,
        decoder.max_model_len,
    )
    with UvicornThread(
        create_http_app(Gateway([route], KeyStore(None), LocalLimiter(), signer=SIGNER))
    ) as server:
        yield original, server
    decoder.shutdown()
    preprocessor.close()


def test_converted_checkpoint_answers_like_the_original(served_converted):
    original, server = served_converted
    image = png(900, 450, seed=5)  # 2x1 grid + thumbnail
    question = "Describe the image in detail."
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
    got = client.chat.completions.create(
        model=MODEL,
        max_tokens=6,
        temperature=0,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()},
                    },
                    {"type": "text", "text": question},
                ],
            }
        ],
    )
    pixels = torch.from_numpy(reference_load_image(image, max_num=12))
    prompt = reference_chat_prompt(original.template, original.system_message, question, num_images=1)
    ids = original.reference_tokenizer.encode(
        expand_images(prompt, [pixels.shape[0]], original.tokens_per_tile)
    )
    want_ids = original.model.greedy(ids, pixels, original.image_token_id, max_new_tokens=6)
    assert len(set(want_ids)) > 1
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(original.path.parent / "native")
    assert got.choices[0].message.content == tokenizer.decode(want_ids, skip_special_tokens=True)
    assert got.usage.prompt_tokens == len(ids)
    assert np.isfinite(got.usage.completion_tokens)
