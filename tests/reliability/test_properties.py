"""Properties that must hold for every input, checked on inputs hypothesis makes up.

Tiling: for any image size and tile bounds the grid stays within the bounds, matches the reference,
agrees with ``count_tiles`` (what the gateway meters and charges before any pixel is decoded) and
with the tiles actually cut. Request schema: no JSON body, however odd, makes the chat-completions
path fail with anything but a client error. Bounded (tens of examples, no deadline) to stay cheap
in CI; the corpus in ``test_bad_input.py`` covers the cases we know by name.
"""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from services.common.errors import InvalidArgument, MeshError
from services.common.types import MAX_TILES_PER_IMAGE, TilingParams
from services.demo.reference import reference_grid
from services.preprocess.tiling import count_tiles, find_grid, tile_image
from tests.support.gateway import MODEL, make_gateway
from tests.support.gateway_servers import GatewayServers
from tests.support.images import png

BOUNDED = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tile_bounds(draw):
    max_num = draw(st.integers(1, MAX_TILES_PER_IMAGE))
    return draw(st.integers(1, max_num)), max_num


# -- tiling ---------------------------------------------------------------------------------------


@BOUNDED
@given(
    width=st.integers(1, 100_000),
    height=st.integers(1, 100_000),
    bounds=tile_bounds(),
    thumbnail=st.booleans(),
)
def test_grid_within_bounds_and_count_consistent(width, height, bounds, thumbnail):
    min_num, max_num = bounds
    params = TilingParams(min_num=min_num, max_num=max_num, use_thumbnail=thumbnail).validate()
    cols, rows = find_grid(width, height, params)
    assert min_num <= cols * rows <= max_num
    assert (cols, rows) == reference_grid(width, height, min_num, max_num)
    assert count_tiles(width, height, params) == cols * rows + int(thumbnail and cols * rows > 1)


@BOUNDED
@given(
    width=st.integers(1, 400),
    height=st.integers(1, 400),
    bounds=tile_bounds(),
    tile_size=st.sampled_from([14, 28, 56]),
)
def test_tiles_have_the_planned_shape(width, height, bounds, tile_size):
    """Small tile sizes keep the resizes cheap; the grid logic does not depend on the size."""
    min_num, max_num = bounds
    params = TilingParams(min_num=min_num, max_num=max_num, tile_size=tile_size).validate()
    img = Image.fromarray(np.full((height, width, 3), 127, dtype=np.uint8))
    tiled = tile_image(img, params)
    assert tiled.tiles.dtype == np.uint8
    assert tiled.tiles.shape == (count_tiles(width, height, params), tile_size, tile_size, 3)
    assert tiled.grid == find_grid(width, height, params)
    assert tiled.has_thumbnail == (tiled.grid[0] * tiled.grid[1] > 1)


@BOUNDED
@given(min_num=st.integers(-5, 50), max_num=st.integers(-5, 50), tile_size=st.integers(-10, 4000))
def test_out_of_range_tile_parameters_are_invalid_argument(min_num, max_num, tile_size):
    params = TilingParams(min_num=min_num, max_num=max_num, tile_size=tile_size)
    valid = 1 <= min_num <= max_num <= MAX_TILES_PER_IMAGE and 14 <= tile_size <= 1792
    if valid:
        assert params.validate() is params
    else:
        with pytest.raises(InvalidArgument):
            params.validate()


# -- request schema -------------------------------------------------------------------------------

SMALL_PNG = png(32, 32, seed=3)
URLS = st.sampled_from(
    [
        "data:image/png;base64," + base64.b64encode(SMALL_PNG).decode(),
        "data:image/png;base64," + base64.b64encode(b"not an image").decode(),
        "data:image/png;base64,%%%",
        "data:image/png;base64,",
        "http://127.0.0.1:1/x.png",
        "",
    ]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
ROLES = st.sampled_from(["user", "system", "assistant", "developer", "tool", "", "USER"]) | JSONISH
PARTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=60) | JSONISH}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": st.fixed_dictionaries(
                {"url": URLS}, optional={"detail": st.sampled_from(["low", "high", "auto"]) | JSONISH}
            ),
        }
    ),
    JSONISH,
)
MESSAGE = st.fixed_dictionaries(
    {"role": ROLES},
    optional={"content": st.text(max_size=60) | st.lists(PARTS, max_size=3) | JSONISH, "name": JSONISH},
)
FIELDS = [
    "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "logprobs", "top_logprobs",
    "stream", "stream_options", "user", "max_num", "timeout", "tools", "response_format", "logit_bias",
]  # fmt: skip
BODIES = st.one_of(
    st.fixed_dictionaries(
        {"model": st.just(MODEL) | JSONISH, "messages": st.lists(MESSAGE, max_size=3) | JSONISH},
        optional={f: JSONISH for f in FIELDS},
    ),
    JSONISH,
)


def _through_schema(raw) -> None:
    """What ``/v1/chat/completions`` does with a parsed body before the gateway: only client errors."""
    from pydantic import ValidationError

    from gateway.openai_schema import ChatCompletionRequest

    if not isinstance(raw, dict):
        return  # the HTTP layer answers 400 invalid_json
    try:
        parsed = ChatCompletionRequest.model_validate(raw)
    except ValidationError:
        return
    try:
        parsed.to_domain(12)
    except MeshError as exc:
        assert 400 <= exc.http_status < 500, exc


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=BODIES)
def test_schema_never_fails_with_a_server_error(raw):
    _through_schema(json.loads(json.dumps(raw)))  # as the server sees it: after a JSON round trip


@pytest.fixture(scope="module")
def http_url(cores):
    """A gateway whose tenant caps max_tokens at 4, so a valid random body generates only briefly."""
    from gateway.tenancy.config import Tenant, TenantLimits
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter

    limits = TenantLimits(
        requests_per_s=10_000, max_concurrent=1_000, tokens_per_min=10**9, max_tokens_per_request=4
    )
    keys = KeyStore(None, single_tenant_default=Tenant(name="default", limits=limits))
    with GatewayServers(make_gateway(cores, keys, LocalLimiter(), default_timeout_s=30)) as servers:
        yield servers.http_url


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(raw=BODIES)
def test_http_never_answers_random_bodies_with_a_server_error(http_url, raw):
    content = json.dumps(raw).encode()
    with httpx.Client(timeout=30) as client:
        r = client.post(http_url + "/chat/completions", content=content)
    assert r.status_code < 500, r.text[:300]
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
