"""The mesh's services in one process, over real gRPC, without Ray: development and standalone use.

``internvl-mesh serve-grpc`` builds this from flags. Preprocess and the vision encoder share one
gRPC server (one port); the encoder tiles misses through the in-process preprocessor. Health reports
SERVING only after the weights are loaded and a warm-up image has gone through the encoder. As under
Ray, every call must carry a request context signed with the mesh secret (``IVM_MESH_SECRET``, read at
start; ``services.common.context.ContextSigner`` signs): these servers trust no caller that lacks it.
"""

from __future__ import annotations

import asyncio
import io
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from services.common.grpc_server import MAX_MESSAGE_BYTES, start_server
from services.common.serve_args import mesh_signer
from services.common.types import TilingParams

log = logging.getLogger(__name__)


@dataclass
class StandaloneConfig:
    model: Path
    host: str = "127.0.0.1"
    port: int = 50051
    device: str = "cpu"
    dtype: str = "auto"
    redis_url: str = ""
    max_message_bytes: int = MAX_MESSAGE_BYTES
    grace_s: float = 10.0
    preprocess: dict = field(default_factory=dict)

    def encoder_config(self):
        """The encoder's config (``services.encoder.config.EncoderConfig``)."""
        from services.embedding_cache.config import RedisStoreConfig
        from services.encoder.config import EncoderConfig

        return EncoderConfig(
            checkpoint=str(self.model),
            device=self.device,
            dtype=self.dtype,
            redis=RedisStoreConfig(url=self.redis_url) if self.redis_url else None,
            fallback="inline",
        )


def check_standalone(config: StandaloneConfig) -> None:
    """Refuse, before anything starts, a checkpoint that the encoder cannot serve (``mesh.support``)."""
    from mesh.support import check_checkpoint
    from services.encoder import support

    encoder = config.encoder_config()
    check_checkpoint(
        Path(config.model).name,
        config.model,
        {"encoder": lambda ckpt: support.check_checkpoint(ckpt, encoder)},
    )


def _warmup_image() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (896, 448), (127, 64, 200)).save(buf, format="PNG")
    return buf.getvalue()


async def serve_standalone(config: StandaloneConfig, ready: asyncio.Event | None = None) -> None:
    from services.common.checkpoint import Checkpoint
    from services.encoder.core import EncoderCore, ImageInput, PreprocessorTileSource
    from services.encoder.server import EncoderServicer
    from services.preprocess.config import PreprocessConfig
    from services.preprocess.pipeline import Preprocessor
    from services.preprocess.server import PreprocessServicer

    signer = mesh_signer("standalone")  # callers sign their contexts with the same secret
    ckpt = Checkpoint.open(config.model)
    max_num = ckpt.max_dynamic_patch()
    preprocessor = Preprocessor(PreprocessConfig.model_validate(config.preprocess))
    encoder = EncoderCore.from_config(
        config.encoder_config(), tile_source=PreprocessorTileSource(preprocessor)
    )
    server = await start_server(
        [
            PreprocessServicer(preprocessor, signer, max_num).registration(),
            EncoderServicer(encoder, signer, max_num).registration(),
        ],
        host=config.host,
        port=config.port,
        max_message_bytes=config.max_message_bytes,
        serving=False,
    )
    # Warm up before reporting SERVING: the first forward allocates and picks kernels.
    await encoder.embed_images([ImageInput(_warmup_image(), TilingParams(max_num=2))], namespace="warmup")
    server.set_serving(True)
    print(
        f"internvl-mesh: serving {ckpt.path} on {config.host}:{server.port} (gRPC: preprocess, encoder; "
        "health and reflection on)",
        flush=True,
    )
    if ready is not None:
        ready.set()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("internvl-mesh: shutting down (finishing requests in flight)", flush=True)
    await server.stop(config.grace_s)
    await encoder.close()
    preprocessor.close()
