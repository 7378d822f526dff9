"""The OpenAI-compatible HTTP API, exercised with the official `openai` client over loopback, with
real encoder and decoder cores behind it. Greedy answers equal the reference pipeline's."""

import base64

import httpx
import openai
import pytest

from tests.support.gateway import MODEL, reference_answer
from tests.support.images import png


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def client(inprocess_gateway):
    return openai.OpenAI(base_url=inprocess_gateway["server"].base_url, api_key="unused", max_retries=0)


IMG_A = png(900, 450, seed=1)  # 2x1 grid + thumbnail: 3 tiles
IMG_B = png(300, 300, seed=2)  # 1 tile


def _user(question, *images):
    return [
        {
            "role": "user",
            "content": [
                *({"type": "image_url", "image_url": {"url": data_uri(i)}} for i in images),
                {"type": "text", "text": question},
            ],
        }
    ]


def _reference_messages(question, n_images):
    return [
        {
            "role": "user",
            "content": [*({"type": "image"} for _ in range(n_images)), {"type": "text", "text": question}],
        }
    ]


@pytest.mark.parametrize("images", [(), (IMG_A,), (IMG_A, IMG_B)], ids=["text", "one-image", "two-images"])
def test_greedy_completion_equals_the_reference(client, reference_model, images):
    model, tokenizer = reference_model
    question = "What is in the picture?"
    got = client.chat.completions.create(
        model=MODEL, messages=_user(question, *images), max_tokens=12, temperature=0
    )
    want = reference_answer(
        model, tokenizer, _reference_messages(question, len(images)), list(images), 12, 12
    )
    assert got.choices[0].message.content == want
    assert got.usage.completion_tokens == 12 and got.choices[0].finish_reason == "length"
    assert (
        got.usage.prompt_tokens_details.image_tokens == 256 * (3 * (IMG_A in images) + (IMG_B in images))
        if images
        else True
    )


def test_repeated_image_hits_the_cache_and_answers_the_same(client, inprocess_gateway, reference_model):
    model, tokenizer = reference_model
    encoder = inprocess_gateway["encoder"]
    img = png(640, 480, seed=7)
    first = client.chat.completions.create(
        model=MODEL, messages=_user("Describe.", img), max_tokens=8, temperature=0
    )
    hits_before = encoder.stats.hits_lru + encoder.stats.hits_shared
    second = client.chat.completions.create(
        model=MODEL, messages=_user("Describe.", img), max_tokens=8, temperature=0
    )
    assert encoder.stats.hits_lru + encoder.stats.hits_shared == hits_before + 1
    assert first.choices[0].message.content == second.choices[0].message.content
    assert second.choices[0].message.content == reference_answer(
        model, tokenizer, _reference_messages("Describe.", 1), [img], 12, 8
    )


def test_streaming_with_usage_equals_non_streaming(client):
    messages = _user("Tell me about it.", IMG_B)
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]


def test_logprobs_and_stop(client):
    got = client.chat.completions.create(
        model=MODEL, messages=_user("Hi"), max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    lps = got.choices[0].logprobs.content
    assert len(lps) == got.usage.completion_tokens
    assert all(
        len(lp.top_logprobs) == 2 and lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob for lp in lps
    )


def test_list_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ({"model": "nope", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 7},
            400,
            "temperature",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10_000_000},
            400,
            "max_tokens",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 17},
            400,
            "n must be in 1..16",
        ),
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
            400,
            "tool",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}],
                    }
                ],
            },
            400,
            "remote image",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}],
                    }
                ],
            },
            400,
            "base64",
        ),
        (
            {
                "model": MODEL,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_uri(b"not an image at all")}}
                        ],
                    }
                ],
            },
            400,
            "image",
        ),
    ],
)
def test_bad_requests_get_openai_errors(inprocess_gateway, body, status, fragment):
    r = httpx.post(inprocess_gateway["server"].base_url + "/chat/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"].lower() or fragment in (err.get("param") or "")


def test_malformed_json(inprocess_gateway):
    r = httpx.post(
        inprocess_gateway["server"].base_url + "/chat/completions",
        content=b"{not json",
        timeout=10,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "json" in r.json()["error"]["message"].lower()


def test_an_event_is_one_line_for_every_line_reader():
    """Model text may hold U+2028, U+2029 or NEL, which str.splitlines and httpx's aiter_lines end a
    line at: each SSE event must still be one line of JSON that gives the text back."""
    import json

    from gateway.http_api import sse_json

    text = "a\u2028b\u2029c\x85d\ne"
    line = sse_json({"choices": [{"delta": {"content": text}}]})
    assert line.splitlines() == [line]
    assert json.loads(line)["choices"][0]["delta"]["content"] == text
