"""The decoder's own bounds on what it is asked, whoever asks (``services.common.limits``).

The gateway checks the same bounds for the public APIs before any work is done; the decoder checks them
again on every entry point, so that a request that did not come through the gateway's checks (a bug, or
an internal client) still cannot make it build a prompt of millions of tokens or hold the batch with
hundreds of images. The engine itself bounds ``max_tokens`` by the context and validates the sampling
parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.common.errors import InvalidArgument
from services.common.limits import (
    MAX_MESSAGES,
    MAX_TEXT_BYTES,
    check_image_tiles,
    check_n,
)
from services.common.refs import EmbeddingRef
from services.decoder.types import ChatMessage, DecodeRequest, TextContent, entry_frames


def text_bytes(messages: Sequence[ChatMessage]) -> int:
    """UTF-8 bytes of every text part of ``messages``."""
    return sum(
        len(p.text.encode("utf-8", "surrogatepass"))
        for m in messages
        for p in m.content
        if isinstance(p, TextContent)
    )


def check_messages(messages: Sequence[ChatMessage]) -> None:
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(
            f"{len(messages)} messages, over the limit of {MAX_MESSAGES}", reason="too_many_messages"
        )
    if text_bytes(messages) > MAX_TEXT_BYTES:
        raise InvalidArgument(f"message text exceeds {MAX_TEXT_BYTES} bytes", reason="prompt_too_long")


def check_request(request: DecodeRequest, refs: Sequence[EmbeddingRef]) -> None:
    check_n(request.n)
    check_messages(request.messages)
    check_image_tiles([r.tiles for r in refs], [r.frames for r in refs])
    frames = entry_frames(request.messages)
    if len(frames) == len(refs) and frames != [r.frames for r in refs]:
        raise InvalidArgument(
            f"the messages' videos have {frames} frames, their embedding references {[r.frames for r in refs]}",
            reason="image_count_mismatch",
        )
