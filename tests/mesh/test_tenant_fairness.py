"""Fair share between tenants on the whole mesh (Ray Serve, the tiny checkpoint, fp32 on CPU), as
``benchmarks/fairness_bench.py`` sets it up: one mesh serving the same checkpoint as model ``fair``
(fair share on) and model ``fifo`` (off), tenants A and B with keys of their own.

Per model, tenant A floods the decoder (3 x max_num_seqs long-prompt requests through the gateway's
HTTP API, the official openai client), then tenant B sends one short request. The figures come from
the engine's own counters (the decoder deployment's ``info()["tenants"]``): with fair share, no
request of A is admitted while B's waits, and B is answered before A's backlog drains; without it,
A's queued requests go first. B's greedy answer is the same on both models."""

from __future__ import annotations

import threading
import time

import openai
import pytest

from benchmarks.fairness_bench import LONG_PROMPT, tenants_file
from tests.support.mesh import deployed, mesh_config, model_entry

pytestmark = pytest.mark.ray

MAX_NUM_SEQS = 4
A_MAX_TOKENS = 128  # a batch of A's takes a while: B arrives while A's requests wait
B_MAX_TOKENS = 4
WAIT_S = 60.0  # bound on every wait (a loaded machine)


def _entry(name: str, checkpoint, fair: bool) -> dict:
    return model_entry(
        name,
        checkpoint,
        decoder_settings={
            "cache": {"num_blocks": 1024},
            "scheduler": {"max_num_seqs": MAX_NUM_SEQS, "fair_share": fair},
        },
        encoder_settings={"batching": {"fair_share": fair}},
    )


@pytest.fixture(scope="module")
def mesh(ray_serve, tiny_checkpoint, tmp_path_factory):
    from ray import serve

    tenants = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    keys = tenants_file(tenants)
    cfg = mesh_config(
        ray_serve["http_port"],
        [_entry("fair", tiny_checkpoint, True), _entry("fifo", tiny_checkpoint, False)],
        gateway={"tenants_file": str(tenants)},
    )
    base = f"http://127.0.0.1:{ray_serve['http_port']}/v1"
    with deployed(cfg):
        yield {
            "clients": {
                t: openai.OpenAI(base_url=base, api_key=k, max_retries=0, timeout=WAIT_S)
                for t, k in keys.items()
            },
            "decoders": {m.name: serve.get_app_handle(m.decoder_app) for m in cfg.models},
        }


def _chat(client: openai.OpenAI, model: str, prompt: str, max_tokens: int) -> tuple[str, float]:
    """The greedy answer and when it completed."""
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )
    return r.choices[0].message.content, time.monotonic()


def _tenants(decoder) -> dict[str, dict[str, float]]:
    return decoder.info.remote().result(timeout_s=WAIT_S).get("tenants", {})


def _wait_for(decoder, ready, what: str) -> dict[str, dict[str, float]]:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        tenants = _tenants(decoder)
        if ready(tenants):
            return tenants
        time.sleep(0.05)
    raise AssertionError(f"{what} within {WAIT_S} s: {tenants}")


def flood_then_b(mesh, model: str) -> dict:
    """A floods ``model``; once a whole batch of A's requests waits in the engine, B sends one."""
    clients, decoder = mesh["clients"], mesh["decoders"][model]
    _chat(clients["A"], model, "warm up", 2)
    a_done: list[float] = []

    def tenant_a(k: int) -> None:
        a_done.append(_chat(clients["A"], model, f"{k} {LONG_PROMPT}", A_MAX_TOKENS)[1])

    flood = [threading.Thread(target=tenant_a, args=(k,), daemon=True) for k in range(3 * MAX_NUM_SEQS)]
    for t in flood:
        t.start()
    _wait_for(
        decoder,
        lambda ts: (
            ts.get("A", {}).get("running", 0) == MAX_NUM_SEQS
            and ts.get("A", {}).get("waiting", 0) >= MAX_NUM_SEQS
        ),
        "A's flood did not fill the batch and the queue",
    )
    b_text, b_done = _chat(clients["B"], model, "Say hello.", B_MAX_TOKENS)
    for t in flood:
        t.join(WAIT_S)
    assert len(a_done) == 3 * MAX_NUM_SEQS, "A's flood did not complete"
    tenants = _wait_for(decoder, lambda ts: ts.get("B", {}).get("admissions", 0) >= 1, "B's admission unseen")
    return {"b": tenants["B"], "b_text": b_text, "a_after_b": sum(1 for t in a_done if t > b_done)}


@pytest.fixture(scope="module")
def outcomes(mesh):
    return {model: flood_then_b(mesh, model) for model in ("fair", "fifo")}


def test_with_fair_share_b_is_not_passed_over_and_answers_before_a_drains(outcomes):
    fair = outcomes["fair"]
    assert fair["b"]["passed_over"] == 0
    # more of A finished after B than one batch: B went ahead of A requests that were queued
    assert fair["a_after_b"] > MAX_NUM_SEQS


def test_without_fair_share_a_queued_flood_goes_first(outcomes):
    fifo = outcomes["fifo"]
    assert fifo["b"]["passed_over"] > 0
    # B is admitted after every queued A request: at most the batch it joined finishes after it
    assert fifo["a_after_b"] <= MAX_NUM_SEQS


def test_b_greedy_answer_is_the_same_on_both_models(outcomes):
    assert outcomes["fair"]["b_text"] == outcomes["fifo"]["b_text"]
    assert outcomes["fair"]["b_text"]
