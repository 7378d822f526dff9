"""`internvl-mesh serve` as a user runs it: a subprocess with its own Ray, ready only after weights
are loaded, answering the README's example requests; SIGTERM in the middle of a stream lets the
stream finish, then the process exits cleanly."""

import base64
import json
import os
import signal
import threading
import time

import httpx
import pytest

from tests.support.images import png
from tests.support.serve_process import serve_process

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(log, "--model", str(tiny_checkpoint)) as proc:
        yield {**proc, "model": tiny_checkpoint.name}


def test_readme_curl_request(served):
    uri = "data:image/png;base64," + base64.b64encode(png(800, 600, seed=4)).decode()
    body = {
        "model": served["model"],
        "max_tokens": 8,
        "temperature": 0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": uri}},
                    {"type": "text", "text": "What is in this image?"},
                ],
            }
        ],
    }
    r = httpx.post(served["base"] + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 8
    assert httpx.get(served["base"] + "/ready", timeout=10).status_code == 200


def test_sigterm_during_a_stream_lets_it_finish(served):
    body = {
        "model": served["model"],
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "messages": [{"role": "user", "content": "Write a long story."}],
    }
    events: list[str] = []

    def read():
        with httpx.stream("POST", served["base"] + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 60
    while len(events) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(events) >= 3, "the stream did not start"
    os.kill(served["proc"].pid, signal.SIGTERM)
    reader.join(120)
    assert events[-1] == "[DONE]"
    finals = [json.loads(e) for e in events[:-1] if '"finish_reason": "length"' in e]
    assert finals, "the stream was cut before its end"
    assert served["proc"].wait(timeout=120) == 0
    assert "stopped" in served["log"].read_text()
