"""Image intake: data URIs and raw bytes in, bounded; remote URLs refused unless enabled.

Fetching a URL on a caller's behalf is a server-side request forgery risk, so it is off by default;
the only accepted form is a ``data:image/...;base64,`` URI whose decoded size is bounded *before*
decoding (from the base64 length).
"""

from __future__ import annotations

import base64
import binascii
import re

from services.common.errors import InvalidArgument
from services.common.limits import MAX_IMAGE_BYTES

_DATA_URI = re.compile(
    r"^data:(?P<mime>image/[A-Za-z0-9.+-]+)?(?P<params>(;[A-Za-z0-9=.+-]+)*);base64,", re.ASCII
)


def is_remote(url: str) -> bool:
    return isinstance(url, str) and url.startswith(("http://", "https://"))


def checked_media(data: bytes, kind: str = "image", limit: int = MAX_IMAGE_BYTES) -> bytes:
    """``data`` if it holds between 1 byte and ``limit``; InvalidArgument (``<kind>_empty``,
    ``<kind>_too_large``) otherwise."""
    if not data:
        raise InvalidArgument(f"{kind} holds no bytes", reason=f"{kind}_empty")
    if len(data) > limit:
        raise InvalidArgument(f"{kind} is larger than the {limit}-byte limit", reason=f"{kind}_too_large")
    return data


def checked_image(data: bytes) -> bytes:
    return checked_media(data)


def decode_media_data_uri(
    url: str,
    kind: str = "image",
    limit: int = MAX_IMAGE_BYTES,
    pattern: re.Pattern = _DATA_URI,
    example: str = "png",
) -> bytes:
    """The bytes of a base64 ``data:`` URI of ``kind`` (image or video), at most ``limit`` of them, its
    size bounded from the base64 length before decoding; InvalidArgument with a reason otherwise."""
    field = f"{kind}_url"
    if not isinstance(url, str) or not url:
        raise InvalidArgument(f"{field}.url must be a non-empty string", reason=f"{field}_invalid")
    if url.startswith(("http://", "https://")):
        raise InvalidArgument(
            f"remote {kind} URLs are not fetched by this server; send the {kind} as a data URI "
            f"(data:{kind}/{example};base64,...)",
            reason="remote_images_disabled",
        )
    match = pattern.match(url)
    if match is None:
        raise InvalidArgument(
            f"{field}.url must be a base64 data URI: data:{kind}/<type>;base64,<data>",
            reason=f"{field}_invalid",
        )
    payload = url[match.end() :]
    if len(payload) > (limit * 4) // 3 + 4:
        raise InvalidArgument(f"{kind} is larger than the {limit}-byte limit", reason=f"{kind}_too_large")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(
            f"{kind} data URI is not valid base64: {exc}", reason=f"{field}_invalid"
        ) from None
    return checked_media(data, kind, limit)


def decode_data_uri(url: str) -> bytes:
    """The bytes of a base64 ``data:image/...`` URI; InvalidArgument with a reason for anything else."""
    return decode_media_data_uri(url)


def max_num_for_detail(detail: str | None, model_default: int) -> int | None:
    """OpenAI's ``detail``: ``low`` is one tile, ``high`` the model's maximum, ``auto`` the default."""
    if detail in (None, "auto"):
        return None
    if detail == "low":
        return 1
    if detail == "high":
        return model_default
    raise InvalidArgument(
        f"image_url.detail must be auto, low or high, got {detail!r}", reason="invalid_detail"
    )
