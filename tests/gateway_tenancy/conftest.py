"""Fixtures of the tenancy suite: Redis db 11 under a key prefix unique to this run, deleted at the end.

``OwnRedis`` is a redis-server owned by one test (its own port, no persistence), for outages: the test
kills, pauses or restarts it by its PID.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid

import pytest
import redis

from gateway.tenancy import RedisLimiter, Tenant, TenantLimits

REDIS_URL = "redis://127.0.0.1:6379/11"
RUN_PREFIX = f"ivm:limtest:{uuid.uuid4().hex[:8]}:"


def make_tenant(name: str | None = None, **limits) -> Tenant:
    """A tenant with a fresh name (so tests never share counters) and the given limits."""
    return Tenant(name=name or f"t{uuid.uuid4().hex[:10]}", limits=TenantLimits(**limits))


@pytest.fixture(scope="session")
def sync_redis():
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail("the Redis server at 127.0.0.1:6379 is not running")
    yield client
    keys = list(client.scan_iter(match=f"{RUN_PREFIX}*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])
    client.close()


@pytest.fixture
async def limiters(sync_redis):
    """A factory of RedisLimiters on db 11, each with its own connection pool; closed after the test."""
    made: list[RedisLimiter] = []

    def make(**kwargs) -> RedisLimiter:
        kwargs.setdefault("prefix", RUN_PREFIX)
        limiter = RedisLimiter.from_url(REDIS_URL, op_timeout_s=2.0, **kwargs)
        made.append(limiter)
        return limiter

    yield make
    for limiter in made:
        await limiter.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OwnRedis:
    """A redis-server on its own port, started, paused, resumed and stopped by its own PID."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> OwnRedis:
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


@pytest.fixture
def own_redis():
    server = OwnRedis().start()
    yield server
    server.kill()
