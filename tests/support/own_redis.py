"""A redis-server owned by one test: its own free port on 127.0.0.1, no persistence, started,
paused, resumed and killed by its own PID (never anything else), for outage tests."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import redis

from tests.support.ports import free_port


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
