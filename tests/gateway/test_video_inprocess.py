"""Video through the mesh, with the official ``openai`` client over HTTP and a real gRPC channel, real
encoder and decoder cores: the greedy answer equals transformers' ``generate`` on the frames OpenGVLab's
``load_video`` makes (decord + ``get_index`` + one tile per frame) and the prompt transformers'
``InternVLProcessor`` writes; a second question about the same video decodes and encodes nothing."""

from __future__ import annotations

import base64

import grpc
import openai
import pytest
import torch
from internvl.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from tests.support.gateway import MODEL, make_gateway
from tests.support.gateway_servers import GatewayServers
from tests.support.videos import Clip, make_clip, reference_load_video

CLIP = make_clip(Clip(frames=40, width=320, height=176, gop=8))
QUESTION = "What happens in the video?"


def video_uri(data: bytes) -> str:
    return "data:video/mp4;base64," + base64.b64encode(data).decode()


def video_messages(data: bytes, question: str = QUESTION, **options) -> list[dict]:
    part = {"type": "video_url", "video_url": {"url": video_uri(data), **options}}
    return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]


def reference_video_answer(model, tokenizer, data, question, max_new_tokens, bound=None, num_segments=8):
    """``load_video`` frames + the checkpoint's template with a video part, ``<video>`` replaced as
    transformers' ``InternVLProcessor.replace_video_token`` does + ``generate``, greedy."""
    pixels, patches, _ = reference_load_video(data, ".mp4", bound=bound, num_segments=num_segments)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    image = "<img>" + "<IMG_CONTEXT>" * 256 + "</img>"
    frames = "\n".join(f"Frame{i + 1}: {image}" for i in range(len(patches)))
    ids = tokenizer(
        prompt.replace("<video>", frames), add_special_tokens=False, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            pixel_values=torch.from_numpy(pixels),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.fixture(scope="module")
def servers(cores):
    from gateway.tenancy.keys import KeyStore
    from gateway.tenancy.limiter import LocalLimiter

    with GatewayServers(make_gateway(cores, KeyStore(None), LocalLimiter(), default_timeout_s=120)) as s:
        yield s


@pytest.fixture(scope="module")
def client(servers):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{servers.http_port}/v1", api_key="unused", max_retries=0)


def test_answer_equals_transformers_generate_on_load_video_frames(client, reference_model, cores):
    model, tokenizer = reference_model
    got = client.chat.completions.create(
        model=MODEL, messages=video_messages(CLIP), max_tokens=10, temperature=0
    )
    assert got.choices[0].message.content == reference_video_answer(model, tokenizer, CLIP, QUESTION, 10)
    assert got.usage.prompt_tokens_details.image_tokens == 8 * 256


def test_a_second_question_about_the_same_video_decodes_and_encodes_nothing(client, reference_model, cores):
    model, tokenizer = reference_model
    encoder = cores["encoder"]
    client.chat.completions.create(model=MODEL, messages=video_messages(CLIP), max_tokens=2, temperature=0)
    encodes, hits = encoder.stats.encodes, encoder.stats.hits_lru + encoder.stats.hits_shared
    question = "Which colour dominates?"
    got = client.chat.completions.create(
        model=MODEL, messages=video_messages(CLIP, question), max_tokens=8, temperature=0
    )
    assert encoder.stats.encodes == encodes  # nothing decoded (tiles come only with an encode) or encoded
    assert encoder.stats.hits_lru + encoder.stats.hits_shared == hits + 1
    assert got.choices[0].message.content == reference_video_answer(model, tokenizer, CLIP, question, 8)


def test_frames_and_bound_follow_the_reference(client, reference_model):
    model, tokenizer = reference_model
    got = client.chat.completions.create(
        model=MODEL,
        messages=video_messages(CLIP, num_frames=4, bound=[0.4, 1.2]),
        max_tokens=8,
        temperature=0,
    )
    want = reference_video_answer(model, tokenizer, CLIP, QUESTION, 8, bound=(0.4, 1.2), num_segments=4)
    assert got.choices[0].message.content == want
    assert got.usage.prompt_tokens_details.image_tokens == 4 * 256


def test_grpc_video_part_gives_the_same_answer(servers, client):
    http = client.chat.completions.create(
        model=MODEL, messages=video_messages(CLIP, num_frames=6), max_tokens=8, temperature=0
    )
    video = gateway_pb2.Video(data=CLIP, num_frames=6)
    request = gateway_pb2.ChatRequest(
        model=MODEL,
        max_tokens=8,
        messages=[
            gateway_pb2.ChatMessage(
                role="user", content=[gateway_pb2.Part(video=video), gateway_pb2.Part(text=QUESTION)]
            )
        ],
    )
    with grpc.insecure_channel(servers.grpc_target) as channel:
        chunks = list(gateway_pb2_grpc.GatewayServiceStub(channel).Chat(request, timeout=120))
    assert "".join(c.text for c in chunks) == http.choices[0].message.content
    assert chunks[-1].usage.image_tokens == 6 * 256
