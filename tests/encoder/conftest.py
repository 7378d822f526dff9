"""Fixtures of the encoder suite: its Redis db, cleaned after the run (see ``helpers``), and the tiny
checkpoint's encoder (the checkpoint is the suite-wide ``tiny_checkpoint`` fixture)."""

from __future__ import annotations

import pytest

from tests.encoder.helpers import REDIS_URL, RUN_NS
from tests.support.shared_redis import suite_redis


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
