"""The engine in a process of its own (``engine_process``, the default): what only a process can get
wrong. Errors of the engine process reach the caller with their type and reason, a killed engine
process ends every open stream at once and marks the core unhealthy, and no engine process (nor
tensor-parallel rank) outlives its core or its parent. Streaming, cancellation, deadlines and stop
strings run in both modes in ``test_core``."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.decoder.engine.async_engine import DecoderCore
from services.decoder.engine.sampling_params import SamplingParams
from tests.decoder.helpers import CASES, Case, make_config, make_input, tokens_of, user

ROOT = Path(__file__).resolve().parents[2]
LONG = SamplingParams(temperature=0.0, ignore_eos=True)


def gone(pid: int) -> bool:
    """The process has exited (a zombie nobody reaped yet counts as exited)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


async def collect(core, inp):
    return [e async for e in core.generate(inp)]


@pytest.fixture(scope="module")
def core(tiny_ckpt):
    c = DecoderCore(make_config(tiny_ckpt, cache={"num_blocks": 128}, engine_process=True))
    yield c
    c.shutdown()


async def test_a_request_the_engine_refuses_raises_its_invalid_argument(core, reference, monkeypatch):
    """The parent's checks pass; the engine process's scheduler refuses (more KV than the cache has)."""
    make_request = core.intake.make_request

    def oversized(inp):
        req = make_request(inp)
        req.max_tokens = 10**6
        return req

    monkeypatch.setattr(core.intake, "make_request", oversized)
    with pytest.raises(InvalidArgument, match="KV blocks, the cache has 128") as caught:
        await collect(core, make_input("huge", CASES[1], reference))
    assert caught.value.reason == "invalid_argument"
    monkeypatch.undo()
    events = await collect(core, make_input("after-huge", CASES[1], reference))
    assert tokens_of(events) == reference.generate(CASES[1])


async def test_a_failing_step_ends_its_requests_with_error_and_the_engine_serves_on(
    core, reference, monkeypatch
):
    make_request = core.intake.make_request

    def wrong_width(inp):
        req = make_request(inp)
        req.mm_embeddings = [torch.zeros(e.shape[0], e.shape[1] + 1) for e in req.mm_embeddings]
        return req

    monkeypatch.setattr(core.intake, "make_request", wrong_width)
    events = await collect(core, make_input("bad-step", CASES[0], reference))
    assert events[-1].finish_reason == "error" and events[-1].error
    monkeypatch.undo()
    events = await collect(core, make_input("good-step", CASES[0], reference))
    assert tokens_of(events) == reference.generate(CASES[0])
    assert core.stats()["kv_usage"] == 0.0


def test_a_start_up_error_is_raised_with_its_type_and_message(tiny_ckpt):
    config = make_config(tiny_ckpt, cache={"num_blocks": 8}, scheduler={"max_model_len": 1024})
    with pytest.raises(FailedPrecondition, match="max_model_len=1024 tokens needs 64") as caught:
        DecoderCore(config)
    assert caught.value.reason == "kv_cache_too_small"


async def test_a_killed_engine_ends_open_streams_and_the_core_reports_unhealthy(tiny_ckpt, reference):
    core = DecoderCore(make_config(tiny_ckpt, cache={"num_blocks": 128}))
    try:
        pid = core.engine_pid
        core.check_health()
        streams = [
            core.generate(make_input(f"k{i}", Case(user("Talk for a long time."), [], 900), reference, LONG))
            for i in range(2)
        ]
        for stream in streams:
            await stream.__anext__()
        os.kill(pid, signal.SIGKILL)
        start = time.monotonic()
        for stream in streams:
            with pytest.raises(Unavailable, match="engine process exited"):
                await asyncio.wait_for(collect_rest(stream), timeout=10)
        assert time.monotonic() - start < 5
        with pytest.raises(Unavailable):
            core.check_health()
        with pytest.raises(Unavailable):
            await collect(core, make_input("after-kill", CASES[1], reference))
    finally:
        core.shutdown()
    assert gone(pid)


async def collect_rest(stream):
    return [e async for e in stream]


def test_shutdown_leaves_no_engine_process(tiny_ckpt):
    core = DecoderCore(make_config(tiny_ckpt))
    pid = core.engine_pid
    assert psutil.Process(pid).ppid() == os.getpid() and not gone(pid)
    core.shutdown()
    assert gone(pid)


PARENT = """
import sys
from services.decoder.engine.async_engine import DecoderCore
from tests.decoder.helpers import make_config

core = DecoderCore(make_config(sys.argv[1]))
print(core.engine_pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_the_engine_process_exits_when_its_parent_is_killed(tiny_ckpt):
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tiny_ckpt)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pid = int(parent.stdout.readline())
        assert psutil.Process(pid).ppid() == parent.pid
        parent.kill()  # SIGKILL: no clean-up of its own
        parent.wait(10)
        assert wait_gone(pid, timeout=5), "the engine process outlived its parent"
    finally:
        parent.kill()
        parent.wait(10)


@pytest.mark.slow
async def test_tensor_parallel_ranks_run_under_the_engine_process(tiny_ckpt, reference):
    core = DecoderCore(make_config(tiny_ckpt, parallel={"tensor_parallel_size": 2}))
    try:
        children = psutil.Process(core.engine_pid).children()
        ranks = [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]
        assert len(ranks) == 1  # rank 1; rank 0 is the engine process itself
        cases = CASES[:3]
        results = await asyncio.gather(
            *(collect(core, make_input(f"tp{i}", c, reference)) for i, c in enumerate(cases))
        )
        for case, events in zip(cases, results, strict=True):
            assert tokens_of(events) == reference.generate(case)
        pids = [core.engine_pid] + [r.pid for r in ranks]
    finally:
        core.shutdown()
    assert all(gone(pid) for pid in pids)


async def test_structured_outputs_cross_to_the_engine_process(core):
    """A matcher does not cross processes: the engine process compiles the request's response format
    again (off its loop), and the document is valid; a schema that does not compile is refused in the
    parent, before anything crosses."""
    import json

    import jsonschema

    from tests.decoder.test_structured import PERSON, inp, schema_params

    events = await collect(core, inp("json-proc", schema_params(PERSON, temperature=0.0), "Who are you?"))
    assert events[-1].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(e.text for e in events)), PERSON)
    bad = schema_params({"type": "object", "properties": {"a": {"type": "nope"}}})
    with pytest.raises(InvalidArgument) as refused:
        await collect(core, inp("json-bad", bad))
    assert refused.value.reason == "response_format_invalid"


async def test_the_engine_process_reports_its_tenants(core, reference):
    inputs = [make_input(f"t{k}", CASES[1], reference, LONG, tenant=t) for k, t in enumerate(["a", "b", "a"])]
    await asyncio.gather(*(collect(core, i) for i in inputs))
    tenants = core.stats()["tenants"]
    assert tenants["a"]["admissions"] >= 2 and tenants["b"]["admissions"] >= 1
    assert tenants["a"]["tokens"] > 0 and tenants["a"]["running"] == 0
