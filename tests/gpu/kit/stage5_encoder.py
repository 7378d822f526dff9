"""Stage 5: the vision encoder (``services/encoder/vision_model.py``) on the tiny checkpoint.

- host-to-device copy of uint8 448x448 tiles, pinned vs pageable host memory (GB/s; CUDA only);
- forward at 1/8/32/64 tiles (smoke: 1/2) in the serving dtype (bf16 on CUDA, fp32 on CPU), tiles
  already on the device: ms per call and per tile (GPU time on CUDA, wall on CPU);
- parity in fp32 against transformers' ``InternVLModel.get_image_features(...).pooler_output``:
  max |ours - theirs| <= 1e-5 on CPU, 1e-4 on CUDA (TF32 off; kernels differ from CPU's);
- the ``staged_io`` switch (page-locked staging, non-blocking copies, tile buckets): ``encode`` from
  pageable host tiles to host embeddings at 1/8/33/64 tiles (smoke: 1/3), plain vs staged, ms per tile
  (wall: the copies are the point), and the staged embeddings against the plain ones in fp32.
"""

from __future__ import annotations

import torch

from .common import free, synchronize, timed, tiny_checkpoint
from .report import INCONCLUSIVE, Context, StageResult, Verdict, judge


def random_tiles(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 448, 448, 3), dtype=torch.uint8, generator=g)  # (N, H, W, 3)


def host_to_device(ctx: Context, res: StageResult, tiles: torch.Tensor) -> None:
    if ctx.device != "cuda":
        res.add(Verdict("h2d_pinned_vs_pageable", INCONCLUSIVE, "n/a on cpu", "CUDA only"))
        return
    pinned = tiles.pin_memory()
    rates = {}
    for label, host in (("pageable", tiles), ("pinned", pinned)):
        host.to("cuda", non_blocking=True)
        wall, gpu = timed("cuda", lambda h=host: h.to("cuda", non_blocking=True), repeats=10)
        rates[label] = tiles.numel() / gpu / 1e9
    res.figures["h2d_GB_s"] = rates
    res.add(judge("h2d_pinned_vs_pageable", rates["pinned"] >= rates["pageable"],
                  f"pinned {rates['pinned']:.1f} GB/s, pageable {rates['pageable']:.1f} GB/s "
                  f"({tiles.shape[0]} tiles)", "pinned >= pageable"))  # fmt: skip


def forward_timing(ctx: Context, res: StageResult, ckpt) -> None:
    from services.common.checkpoint import Checkpoint
    from services.encoder.vision_model import VisionEncoder

    dtype = "bfloat16" if ctx.device == "cuda" else "float32"
    encoder = VisionEncoder.load(Checkpoint.open(ckpt), device=ctx.device, dtype=dtype)
    rows = []
    for n in (1, 2) if ctx.smoke else (1, 8, 32, 64):
        tiles = random_tiles(n, seed=n).to(ctx.device)
        encoder.encode(tiles)  # warm-up
        wall, gpu = timed(ctx.device, lambda t=tiles: encoder.encode(t), repeats=3)
        sec = gpu if gpu is not None else wall
        rows.append({"tiles": n, "ms_per_call": sec * 1e3, "ms_per_tile": sec * 1e3 / n,
                     "clock": "gpu" if gpu is not None else "wall"})  # fmt: skip
    res.figures["forward"] = {"dtype": dtype, "backend": encoder.backend, "rows": rows}
    per_tile = ", ".join(f"{r['tiles']}: {r['ms_per_tile']:.3f}" for r in rows)
    res.add(judge("forward", all(r["ms_per_tile"] > 0 for r in rows), f"ms/tile by tiles {{{per_tile}}}",
                  "timed, not judged"))  # fmt: skip
    free(ctx.device)


def parity(ctx: Context, res: StageResult, ckpt) -> None:
    from transformers import InternVLModel

    from services.common.checkpoint import Checkpoint
    from services.encoder.vision_model import VisionEncoder
    from services.preprocess.normalize import normalize_tiles

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        tiles = random_tiles(4, seed=7)
        encoder = VisionEncoder.load(Checkpoint.open(ckpt), device=ctx.device, dtype="float32")
        ours = encoder.encode(tiles)  # (N, tokens, hidden), on CPU
        reference = InternVLModel.from_pretrained(ckpt, dtype=torch.float32).to(ctx.device).eval()
        with torch.no_grad():
            theirs = reference.get_image_features(normalize_tiles(tiles.to(ctx.device))).pooler_output
        synchronize(ctx.device)
        err = float((ours - theirs.float().cpu()).abs().max())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    limit = 1e-4 if ctx.device == "cuda" else 1e-5
    res.figures["parity_max_abs_fp32"] = err
    res.add(judge("parity_fp32", err <= limit, f"max |ours - transformers| {err:.2e}", f"<= {limit:.0e}"))


def staged_io(ctx: Context, res: StageResult, ckpt) -> None:
    from services.common.checkpoint import Checkpoint
    from services.encoder.vision_model import VisionEncoder

    dtype = "bfloat16" if ctx.device == "cuda" else "float32"
    encoders = {staged: VisionEncoder.load(Checkpoint.open(ckpt), device=ctx.device, dtype=dtype,
                                           staged_io=staged) for staged in (False, True)}  # fmt: skip
    rows = []
    for n in (1, 3) if ctx.smoke else (1, 8, 33, 64):
        tiles = random_tiles(n, seed=n)  # pageable host memory, as the batcher hands them over
        row = {"tiles": n}
        for staged, encoder in encoders.items():
            encoder.encode(tiles)  # warm-up
            wall, _ = timed(ctx.device, lambda e=encoder, t=tiles: e.encode(t), repeats=3)
            row["staged_ms_per_tile" if staged else "plain_ms_per_tile"] = wall * 1e3 / n
        rows.append(row)
    res.figures["staged_io"] = {"dtype": dtype, "rows": rows}
    speeds = ", ".join(f"{r['tiles']}: {r['plain_ms_per_tile'] / r['staged_ms_per_tile']:.2f}x" for r in rows)
    res.add(judge("staged_io.timing", all(r["staged_ms_per_tile"] > 0 for r in rows),
                  f"plain/staged time by tiles {{{speeds}}}", "timed, not judged"))  # fmt: skip
    fp32 = {staged: VisionEncoder.load(Checkpoint.open(ckpt), device=ctx.device, dtype="float32",
                                       staged_io=staged) for staged in (False, True)}  # fmt: skip
    tiles = random_tiles(5, seed=11)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        err = float((fp32[True].encode(tiles) - fp32[False].encode(tiles)).abs().max())
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    limit = 1e-4 if ctx.device == "cuda" else 1e-5  # a padded batch may pick other GPU kernels
    res.figures["staged_io_max_abs_fp32"] = err
    res.add(
        judge("staged_io.parity_fp32", err <= limit, f"max |staged - plain| {err:.2e}", f"<= {limit:.0e}")
    )
    free(ctx.device)


def run(ctx: Context, res: StageResult) -> None:
    ckpt = tiny_checkpoint(ctx)
    host_to_device(ctx, res, random_tiles(2 if ctx.smoke else 64))
    forward_timing(ctx, res, ckpt)
    parity(ctx, res, ckpt)
    staged_io(ctx, res, ckpt)
