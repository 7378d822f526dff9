"""The bad-input corpus, videos: each bad video part gets its documented 4xx over HTTP and
INVALID_ARGUMENT over gRPC from the same in-process gateway as ``test_bad_input`` (docs/bad-input.md,
"Videos"), and the server still answers a good video afterwards."""

from __future__ import annotations

import grpc
import pytest
from internvl.gateway.v1 import gateway_pb2

from tests.reliability.test_bad_input import _params, _post, body, http, servers, stub, uri  # noqa: F401
from tests.support.gateway import MODEL
from tests.support.images import png
from tests.support.videos import Clip, huge_clip, long_clip, make_clip

GOOD = make_clip(Clip(frames=24, width=96, height=64))
LONG, HUGE = long_clip(), huge_clip()


def video(data: bytes | None = None, url: str | None = None, **extra) -> dict:
    return {"type": "video_url", "video_url": {"url": url or uri(data, "video/mp4"), **extra}}


def with_videos(*parts: dict, role: str = "user") -> dict:
    payload = body([*parts, {"type": "text", "text": "What happens?"}])
    if role != "user":
        payload["messages"] = [{"role": role, "content": list(parts)}, *payload["messages"]]
    return payload


HTTP_CASES = [
    ("video-not-a-video", with_videos(video(png(64, 64))), 400, "video_format_unsupported"),
    ("video-truncated", with_videos(video(GOOD[: len(GOOD) // 2])), 400, "video_corrupt"),
    ("video-empty", with_videos(video(url="data:video/mp4;base64,")), 400, "video_empty"),
    ("video-absurd-duration", with_videos(video(LONG)), 400, "video_too_long"),
    ("video-huge-resolution", with_videos(video(HUGE)), 400, "video_too_large"),
    ("video-num-frames-65", with_videos(video(GOOD, num_frames=65)), 400, "invalid_num_frames"),
    ("video-num-frames-zero", with_videos(video(GOOD, num_frames=0)), 400, "invalid_num_frames"),
    (
        "video-frames-over-tenant-cap",
        with_videos(video(GOOD, num_frames=20), video(GOOD, num_frames=20)),
        400,
        "too_many_frames",
    ),
    ("video-bound-after-the-end", with_videos(video(GOOD, bound=[100, 200])), 400, "video_bound_invalid"),
    ("video-bound-reversed", with_videos(video(GOOD, bound=[2, 1])), 400, "video_bound_invalid"),
    ("video-max-num-41", with_videos(video(GOOD, max_num=41)), 400, "invalid_max_num"),
    ("video-remote-url", with_videos(video(url="https://example.com/a.mp4")), 400, "remote_images_disabled"),
    ("video-image-mime", with_videos(video(url=uri(GOOD))), 400, "video_url_invalid"),
    (
        "video-in-assistant-message",
        with_videos(video(GOOD), role="assistant"),
        400,
        "image_not_in_user_message",
    ),
]


@pytest.mark.parametrize("payload,status,code", _params(HTTP_CASES))
def test_http_bad_video_is_a_client_error(http, payload, status, code):  # noqa: F811
    r = _post(http, payload)
    assert r.status_code == status, r.text[:500]
    assert r.json()["error"]["code"] == code


def chat_video(**video_fields) -> gateway_pb2.ChatRequest:
    part = gateway_pb2.Part(video=gateway_pb2.Video(**video_fields))
    return gateway_pb2.ChatRequest(
        model=MODEL,
        max_tokens=4,
        messages=[gateway_pb2.ChatMessage(role="user", content=[part, gateway_pb2.Part(text="What?")])],
    )


GRPC_CASES = [
    ("video-no-source", chat_video(), "invalid_argument"),
    ("video-not-a-video", chat_video(data=png(64, 64)), "video_format_unsupported"),
    ("video-truncated", chat_video(data=GOOD[: len(GOOD) // 2]), "video_corrupt"),
    ("video-absurd-duration", chat_video(data=LONG), "video_too_long"),
    ("video-huge-resolution", chat_video(data=HUGE), "video_too_large"),
    ("video-num-frames-65", chat_video(data=GOOD, num_frames=65), "invalid_num_frames"),
    (
        "video-bound-reversed",
        chat_video(data=GOOD, bound=gateway_pb2.TimeBound(start_s=2, end_s=1)),
        "video_bound_invalid",
    ),
    ("video-remote-url", chat_video(url="https://example.com/a.mp4"), "remote_images_disabled"),
]


@pytest.mark.parametrize("request_pb,reason", _params(GRPC_CASES))
def test_grpc_bad_video_is_invalid_argument(stub, request_pb, reason):  # noqa: F811
    with pytest.raises(grpc.RpcError) as err:
        list(stub[0].Chat(request_pb, timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    trailers = dict(err.value.trailing_metadata() or ())
    assert trailers.get("x-error-reason") == reason, trailers


def test_the_server_still_answers_a_good_video(http, stub):  # noqa: F811
    r = _post(http, with_videos(video(GOOD, num_frames=4)))
    assert r.status_code == 200, r.text[:500]
    assert r.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 4 * 256
    chunks = list(stub[0].Chat(chat_video(data=GOOD, num_frames=4), timeout=60))
    assert chunks[-1].usage.image_tokens == 4 * 256
