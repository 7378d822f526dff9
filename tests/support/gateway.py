"""The gateway in process (real encoder and decoder cores, real HTTP over loopback), and the reference
pipeline the mesh must reproduce."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

import torch

from services.demo.reference import reference_load_image
from tests.support.ports import free_port
from tests.support.signing import SIGNER

MODEL = "tiny"


def make_gateway(cores, keys, limiter, model: str = MODEL, **limits):
    """A gateway of one route, ``model``, to the in-process ``cores`` (see :func:`local_cores`)."""
    from gateway.core import Gateway, GatewayLimits, ModelRoute
    from mesh.local_clients import LocalDecoderClient, LocalEncoderClient

    route = ModelRoute(
        model,
        LocalEncoderClient(cores["encoder"]),
        LocalDecoderClient(cores["frontend"]),
        12,
        cores["decoder"].max_model_len,
    )
    return Gateway([route], keys, limiter, GatewayLimits(**limits), signer=SIGNER)


def chat_body(content="Hi", max_tokens=4, **extra) -> dict:
    """A greedy chat-completions body for the test model."""
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
        **extra,
    }


def reload_keys_while_serving(app, keys):
    """``app`` with a lifespan that runs ``keys``' reload task on the server's loop, as in a replica."""

    @contextlib.asynccontextmanager
    async def lifespan(_):
        await keys.start()
        yield
        await keys.stop()

    app.router.lifespan_context = lifespan
    return app


class UvicornThread:
    """Serves an ASGI app on 127.0.0.1 in a background thread with its own event loop."""

    def __init__(self, app, port: int | None = None):
        import uvicorn

        self.port = port or free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def reference_answer(
    model, tokenizer, messages, images: list[bytes], max_num: int, max_new_tokens: int
) -> str:
    """OpenGVLab's tiling in PIL/numpy + the checkpoint's chat template via AutoTokenizer +
    ``InternVLForConditionalGeneration.generate(pixel_values=...)``, greedy, one request."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pixel_values, counts = [], []
    for data in images:
        pixels = torch.from_numpy(reference_load_image(data, max_num=max_num))  # (tiles, 3, 448, 448) float32
        counts.append(pixels.shape[0])
        pixel_values.append(pixels)
    pieces = prompt.split("<IMG_CONTEXT>")
    assert len(pieces) == len(images) + 1
    expanded = pieces[0]
    for n, rest in zip(counts, pieces[1:]):
        expanded += "<img>" + "<IMG_CONTEXT>" * (256 * n) + "</img>" + rest
    ids = tokenizer(expanded, add_special_tokens=False, return_tensors="pt").input_ids
    kwargs = {"pixel_values": torch.cat(pixel_values)} if images else {}
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@contextlib.contextmanager
def local_encoder(checkpoint, **encoder_settings):
    """A real encoder core of ``checkpoint`` with its own in-process preprocessor (LRU only, inline
    references); ``encoder_settings`` are more ``EncoderConfig`` fields (``redis=...`` for a cache)."""
    from services.encoder.config import EncoderConfig
    from services.encoder.core import EncoderCore, PreprocessorTileSource
    from services.preprocess.pipeline import Preprocessor

    preprocessor = Preprocessor()
    encoder = EncoderCore.from_config(
        EncoderConfig(
            checkpoint=str(checkpoint), device="cpu", dtype="float32", fallback="inline", **encoder_settings
        ),
        tile_source=PreprocessorTileSource(preprocessor),
    )
    try:
        yield encoder
    finally:
        asyncio.run(encoder.close())
        preprocessor.close()


@contextlib.contextmanager
def local_cores(checkpoint, **decoder_settings):
    """Real encoder (:func:`local_encoder`) and decoder cores of one checkpoint: what a gateway in
    process talks to through ``mesh.local_clients``. ``decoder_settings`` are
    more ``DecoderConfig`` fields."""
    from services.decoder.config import DecoderConfig
    from services.decoder.engine.async_engine import DecoderCore
    from services.decoder.server import DecoderFrontend
    from services.embedding_cache.resolver import EmbeddingResolver

    with local_encoder(checkpoint) as encoder:
        decoder = DecoderCore(DecoderConfig(model=str(checkpoint), dtype="float32", **decoder_settings))
        try:
            yield {
                "encoder": encoder,
                "decoder": decoder,
                "frontend": DecoderFrontend(decoder, EmbeddingResolver(None), SIGNER),
            }
        finally:
            decoder.shutdown()
