"""``verify``: the mesh's side first (tiles, embeddings, tokens), then the reference's, then the verdicts.

The phases load one model at a time (the encoder's vision side, the decoder's language model, then
transformers' whole model), so a checkpoint that fits the device for serving fits it for ``verify``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import torch

from mesh.verify.checks import ReferenceTokens, check_embeddings, check_tiles, check_tokens
from mesh.verify.images import BuiltinImage, builtin_images, prompt_for
from mesh.verify.options import Setup, VerifyOptions, resolve
from mesh.verify.ours import (
    Generation,
    mesh_embeddings,
    mesh_generate,
    mesh_tiles,
    request_messages,
    tiling_params,
)
from mesh.verify.reference import ReferenceModel, reference_pixels, require_chat_template
from mesh.verify.report import ImageFacts, Report
from services.decoder.types import template_messages


def verify(options: VerifyOptions, progress: Callable[[str], None] = lambda _: None) -> Report:
    """Run the three checks on ``options.model``. Raises ``MeshError`` for a checkpoint the services
    refuse; a mismatch is a failed check in the report, not an error."""
    options.validate()
    setup = resolve(options)
    require_chat_template(setup.reference)
    images = builtin_images(options.images)
    pngs = [i.png for i in images]
    prompts = [prompt_for(k) for k in range(len(images))]
    names = [i.name for i in images]
    params = tiling_params(setup)

    progress(f"tiling {len(images)} images (preprocess and the reference load_image)")
    tiled, our_pixels = mesh_tiles(pngs, params)
    ref_pixels = [reference_pixels(data, setup.max_num, setup.tile_size) for data in pngs]
    report = _report(setup, options, images, [t.grid for t in tiled], [t.num_tiles for t in tiled], prompts)
    report.checks.append(check_tiles(names, our_pixels, [torch.from_numpy(p) for p in ref_pixels]))

    progress(f"embedding with the encoder core ({setup.device}, {setup.dtype})")
    refs, our_embeddings = asyncio.run(mesh_embeddings(setup, pngs, params))
    progress(f"generating with the decoder engine, {len(images)} requests one at a time")
    generations = asyncio.run(mesh_generate(setup, refs, prompts, options.max_new_tokens))

    progress(f"running the reference (transformers) from {setup.reference}")
    reference = ReferenceModel(setup.reference, setup.dtype, setup.device)
    try:
        ref_embeddings = [reference.embeddings(p) for p in ref_pixels]
        ref_tokens = _reference_tokens(reference, ref_pixels, prompts, generations, options.max_new_tokens)
    finally:
        reference.close()
    report.checks.append(check_embeddings(names, our_embeddings, ref_embeddings, setup.tolerances))
    report.checks.append(check_tokens(names, generations, ref_tokens, setup.tolerances))
    return report


def _reference_tokens(
    reference: ReferenceModel,
    pixels: Sequence,
    prompts: Sequence[str],
    generations: Sequence[Generation],
    max_new_tokens: int,
) -> list[ReferenceTokens]:
    out = []
    for pix, prompt, ours in zip(pixels, prompts, generations, strict=True):
        messages = template_messages(request_messages(prompt))
        ids = reference.prompt_ids(messages, [len(pix)])
        out.append(
            ReferenceTokens(
                prompt_tokens=len(ids),
                generated=reference.generate(ids, pix, max_new_tokens),
                top1=reference.top1(ids, pix, ours.tokens),
            )
        )
    return out


def _report(
    setup: Setup,
    options: VerifyOptions,
    images: Sequence[BuiltinImage],
    grids: Sequence[tuple[int, int]],
    tiles: Sequence[int],
    prompts: Sequence[str],
) -> Report:
    return Report(
        model=str(setup.checkpoint.path),
        reference=str(setup.reference),
        device=setup.device,
        dtype=setup.dtype,
        dtype_source=setup.dtype_source,
        max_num=setup.max_num,
        max_new_tokens=options.max_new_tokens,
        images=[
            ImageFacts(i.name, i.width, i.height, g, n, p)
            for i, g, n, p in zip(images, grids, tiles, prompts, strict=True)
        ],
    )
