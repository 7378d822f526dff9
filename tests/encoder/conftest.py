"""Fixtures of the encoder suite: Redis db 7, cleaned after the run (the tiny checkpoint is the suite-wide
``tiny_checkpoint`` fixture).

Every key the suite writes lives in db 7 under a namespace unique to this run (``RUN_NS``), or under
``RUN_NS`` as the key prefix; both are deleted when the session ends.
"""

from __future__ import annotations

import uuid

import pytest

from tests.support.own_redis import OwnRedis, suite_redis

REDIS_URL = "redis://127.0.0.1:6379/7"
RUN_NS = f"enctest-{uuid.uuid4().hex[:8]}"


def namespace(name: str = "") -> str:
    """A cache namespace owned by this run (cleaned up at the end)."""
    return f"{RUN_NS}-{name or uuid.uuid4().hex[:6]}"


@pytest.fixture(scope="session")
def sync_redis():
    with suite_redis(REDIS_URL, f"ivm:emb:v1:{RUN_NS}*", f"{RUN_NS}:*") as client:
        yield client


@pytest.fixture(scope="session")
def vision_encoder(tiny_checkpoint):
    """The tiny checkpoint's encoder, loaded once and shared by every core in the suite."""
    from services.common.checkpoint import Checkpoint
    from services.encoder.vision_model import VisionEncoder

    return VisionEncoder.load(Checkpoint.open(tiny_checkpoint))


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A random-noise PNG (noise makes every tile different)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@pytest.fixture
def own_redis():
    server = OwnRedis().start()
    yield server
    server.kill()
