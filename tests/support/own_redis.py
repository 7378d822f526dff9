"""A redis-server owned by one test: its own free port on 127.0.0.1, no persistence, started,
paused, resumed and killed by its own PID (never anything else), for outage tests. Also the shared
Redis of a suite's session, with the keys the suite wrote removed at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time

import redis


@contextlib.contextmanager
def suite_redis(url: str, *patterns: str):
    """A client of the shared Redis at ``url`` (failing the suite at once if it is down); on exit,
    every key matching one of ``patterns`` is deleted."""
    import pytest

    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail(f"the Redis server at {url} is not running (see TOOLING.md)")
    try:
        yield client
    finally:
        for pattern in patterns:
            keys = list(client.scan_iter(match=pattern, count=1000))
            for i in range(0, len(keys), 500):
                client.delete(*keys[i : i + 500])
        client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> OwnRedis:
        """Start (or start again, on the same port, empty)."""
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        try:
            for _ in range(250):
                try:
                    client.ping()
                    return self
                except redis.ConnectionError:
                    time.sleep(0.02)
            raise RuntimeError(f"redis-server on port {self.port} did not start")
        finally:
            client.close()

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a paused server must be able to die
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None
