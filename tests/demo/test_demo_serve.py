"""`internvl-mesh serve` with no model: the embedded demo model answers the README's sample, and the
whole held-out set through the HTTP API (concurrent requests, repeated images) gets the same answers
as transformers' ``generate``, answer for answer."""

import base64
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from services.demo import DEMO_MODEL_NAME
from services.demo.evaluate import accuracy
from tests.demo.helpers import ask
from tests.support.serve_process import serve_process

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "docs" / "demo" / "sample.png"
README_QUESTION = "What colour is the triangle?"
README_ANSWER = "blue"
CONCURRENCY = 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-demo") / "serve.log"
    with serve_process(log, small_cpu=False) as proc:  # no --model, default resources: the README's command
        yield proc


def test_readme_sample_is_answered_right(served):
    assert f"embedded demo model {DEMO_MODEL_NAME}" in served["log"].read_text()
    readme = (ROOT / "README.md").read_text()
    assert README_QUESTION in readme and f'"content": "{README_ANSWER}"' in readme
    body = {
        "model": DEMO_MODEL_NAME,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {
                            "url": "data:image/png;base64," + base64.b64encode(SAMPLE.read_bytes()).decode()
                        },
                    },
                    {"type": "text", "text": README_QUESTION},
                ],
            }
        ],
    }
    r = httpx.post(served["base"] + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == README_ANSWER
    assert choice["finish_reason"] == "stop"


def test_heldout_through_serve_equals_generate(served, heldout_set, generate_answers):
    samples, _ = heldout_set
    client = openai.OpenAI(base_url=served["base"] + "/v1", api_key="unused", max_retries=0, timeout=300)
    pngs = [s.png() for s in samples]
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        got = list(pool.map(lambda i: ask(client, pngs[i], samples[i].question), range(len(samples))))
        # every third image again, concurrently: the embeddings and the prompt prefix come from the caches
        repeat = list(range(0, len(samples), 3))
        again = list(pool.map(lambda i: ask(client, pngs[i], samples[i].question, with_usage=True), repeat))
    mismatches = [
        (samples[i].question, samples[i].answer, generate_answers[i], got[i])
        for i in range(len(samples))
        if got[i] != generate_answers[i]
    ]
    assert not mismatches, json.dumps(mismatches[:20], indent=1)
    assert [a for a, _ in again] == [generate_answers[i] for i in repeat]
    assert all(u.prompt_tokens_details.cached_tokens > 0 for _, u in again)
    assert accuracy(samples, got) == accuracy(samples, generate_answers)
