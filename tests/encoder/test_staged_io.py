"""``staged_io``: the encoder's batches padded to buckets (and, on CUDA, copied through page-locked
buffers without blocking) give the embeddings of the plain path, and the forward sees bucket sizes
only. On the CPU the copies are plain (no page-locked memory without CUDA): the padding is what runs."""

from __future__ import annotations

import torch

from services.common.checkpoint import Checkpoint
from services.encoder.config import EncoderSettings
from services.encoder.vision_model import VisionEncoder, tile_bucket


def tiles(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 448, 448, 3), dtype=torch.uint8, generator=g)  # (N, S, S, 3)


def test_tile_buckets():
    assert [tile_bucket(n) for n in (1, 2, 3, 5, 8, 9, 16, 17, 33)] == [1, 2, 4, 8, 8, 16, 16, 24, 40]
    assert EncoderSettings().staged_io is False  # off until the GPU kit's encoder stage passes with it on


def test_staged_io_gives_the_plain_embeddings(tiny_checkpoint):
    ckpt = Checkpoint.open(tiny_checkpoint)
    plain = VisionEncoder.load(ckpt, "cpu", "float32")
    staged = VisionEncoder.load(ckpt, "cpu", "float32", staged_io=True)
    seen = []
    staged.module.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))
    for n, seed in ((3, 0), (9, 1), (1, 2)):
        batch = tiles(n, seed)
        want = plain.encode(batch)
        got = staged.encode(batch)
        assert got.shape == want.shape == (n, plain.tokens_per_tile, plain.dim)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert seen == [4, 16, 1]


async def test_the_setting_reaches_the_encoder(tiny_checkpoint):
    from prometheus_client import CollectorRegistry

    from services.encoder.config import EncoderConfig
    from services.encoder.core import EncoderCore

    config = EncoderConfig(checkpoint=str(tiny_checkpoint), fallback="inline", staged_io=True)
    core = EncoderCore.from_config(config, registry=CollectorRegistry())
    try:
        assert core.encoder.staged_io
    finally:
        await core.close()
