"""A client that stops reading its stream does not hold up anyone else."""

import socket
import time

import httpx

from tests.support.gateway import MODEL


def test_a_stalled_stream_does_not_block_other_requests(inprocess_gateway):
    server = inprocess_gateway["server"]
    body = (
        b'{"model": "%s", "stream": true, "max_tokens": 2000, "temperature": 0, '
        b'"messages": [{"role": "user", "content": "Tell a very long story."}]}' % MODEL.encode()
    )
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    stalled = socket.create_connection(("127.0.0.1", server.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fill up quickly, then stop reading
    stalled.sendall(request)
    try:
        time.sleep(1.0)
        started = time.monotonic()
        r = httpx.post(
            server.base_url + "/chat/completions",
            json={
                "model": MODEL,
                "max_tokens": 8,
                "temperature": 0,
                "messages": [{"role": "user", "content": "Hi"}],
            },
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8
        assert time.monotonic() - started < 30
    finally:
        stalled.close()
    decoder = inprocess_gateway["decoder"]
    deadline = time.monotonic() + 30
    while decoder.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert decoder.stats()["running"] == 0, "the stalled client's request was not freed after it left"
