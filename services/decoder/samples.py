"""The choices of one request (``n`` > 1): one engine request per sample, one stream of events.

A request with ``n`` choices becomes ``n`` engine requests, ids ``<id>-0`` .. ``<id>-<n-1>``, with the
same prompt, images and sampling values, in one ``prefix_group`` (the request id): the scheduler
prefills the shared prompt once and the other samples take its blocks from the prefix cache
(``engine.siblings``). A ``seed`` ``s`` becomes ``s + k`` for sample ``k`` (modulo 2**63), so the samples
differ and each is reproducible: the same request with the same seed gives the same choices, and choice
``k`` of seed ``s`` is what ``n`` = 1 with seed ``s + k`` gives. Without a seed each sample draws its
own noise; greedy samples are identical.

Their event streams are merged as events come, each tagged with its choice's ``index`` and the
request's id; each choice ends with its own last event. Closing the merged stream (the caller went
away) cancels every sample, whose blocks are freed as a cancelled request's are; an error in one
sample ends the stream with that error and cancels the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

from services.decoder.engine.sampling_params import MAX_SEED
from services.decoder.types import GenerateInput, GenerationEvent


def sample_seed(seed: int | None, k: int) -> int | None:
    """Sample ``k``'s seed: ``seed + k`` (modulo 2**63), None without a seed."""
    return None if seed is None else (seed + k) % (MAX_SEED + 1)


def sample_inputs(inp: GenerateInput, n: int) -> list[GenerateInput]:
    """The engine requests of ``n`` choices of ``inp`` (``inp`` itself when ``n`` is 1)."""
    if n == 1:
        return [inp]
    return [
        replace(
            inp,
            request_id=f"{inp.request_id}-{k}",
            sampling=replace(inp.sampling, seed=sample_seed(inp.sampling.seed, k)),
            prefix_group=inp.request_id,
        )
        for k in range(n)
    ]


async def generate_samples(core: Any, inp: GenerateInput, n: int) -> AsyncIterator[GenerationEvent]:
    """The events of ``n`` choices of ``inp`` from ``core.generate``, merged as they come."""
    if n == 1:
        async for event in core.generate(inp):
            yield event
        return
    merged: asyncio.Queue[GenerationEvent | Exception] = asyncio.Queue()

    async def pump(k: int, sample: GenerateInput) -> None:
        try:
            async for event in core.generate(sample):
                merged.put_nowait(replace(event, request_id=inp.request_id, index=k))
        except Exception as exc:  # noqa: BLE001 - handed to the merged stream, which raises it
            merged.put_nowait(exc)

    tasks = [asyncio.create_task(pump(k, s)) for k, s in enumerate(sample_inputs(inp, n))]
    try:
        open_choices = n
        while open_choices:
            item = await merged.get()
            if isinstance(item, Exception):
                raise item
            open_choices -= item.finished
            yield item
    finally:
        for task in tasks:
            task.cancel()  # a sample still running is aborted (``DecoderCore.generate`` closes)
        await asyncio.gather(*tasks, return_exceptions=True)
