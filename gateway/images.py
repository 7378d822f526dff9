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


def checked_image(data: bytes) -> bytes:
    """``data`` if it holds between 1 byte and the image-size bound; InvalidArgument otherwise."""
    if not data:
        raise InvalidArgument("image holds no bytes", reason="image_empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise InvalidArgument(
            f"image is larger than the {MAX_IMAGE_BYTES}-byte limit", reason="image_too_large"
        )
    return data


def decode_data_uri(url: str) -> bytes:
    """The bytes of a base64 ``data:`` URI; InvalidArgument with a reason for anything else."""
    if not isinstance(url, str) or not url:
        raise InvalidArgument("image_url.url must be a non-empty string", reason="image_url_invalid")
    if url.startswith(("http://", "https://")):
        raise InvalidArgument(
            "remote image URLs are not fetched by this server; send the image as a data URI "
            "(data:image/png;base64,...)",
            reason="remote_images_disabled",
        )
    match = _DATA_URI.match(url)
    if match is None:
        raise InvalidArgument(
            "image_url.url must be a base64 data URI: data:image/<type>;base64,<data>",
            reason="image_url_invalid",
        )
    payload = url[match.end() :]
    if len(payload) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise InvalidArgument(
            f"image is larger than the {MAX_IMAGE_BYTES}-byte limit", reason="image_too_large"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(
            f"image data URI is not valid base64: {exc}", reason="image_url_invalid"
        ) from None
    return checked_image(data)


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
