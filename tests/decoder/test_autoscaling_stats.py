"""The decoder's autoscaling signals: tokens still to compute over the waiting requests, and KV usage,
as numbers (Serve refuses anything else)."""

from types import SimpleNamespace

from services.decoder.autoscaling import autoscaling_stats, waiting_tokens


def test_waiting_tokens_counts_what_is_left_to_compute():
    reqs = [
        SimpleNamespace(num_tokens=100, num_computed_tokens=0),
        SimpleNamespace(num_tokens=50, num_computed_tokens=32),
    ]
    assert waiting_tokens(reqs) == 118
    assert waiting_tokens([]) == 0


def test_stats_are_floats_and_default_to_zero():
    assert autoscaling_stats({"kv_usage": 0.5, "running": 3}) == {"waiting_tokens": 0.0, "kv_usage": 0.5}
    assert autoscaling_stats({"waiting_tokens": 7, "kv_usage": 1}) == {"waiting_tokens": 7.0, "kv_usage": 1.0}


def test_the_engine_reports_its_waiting_tokens(tiny_ckpt):
    """The engine's own report carries the signal (in both modes ``DecoderCore.stats()`` is that report)."""
    from services.decoder.engine.engine_loop import EngineStats
    from services.decoder.engine.llm_engine import LLMEngine
    from services.decoder.engine.sampling_params import SamplingParams
    from services.decoder.types import GenerateInput
    from tests.decoder.helpers import make_config, user

    eng = LLMEngine(make_config(tiny_ckpt, scheduler={"max_num_seqs": 1}))
    try:
        for k in range(3):
            inp = GenerateInput(
                f"w{k}",
                user("count the waiting tokens"),
                sampling=SamplingParams(temperature=0.0),
                max_tokens=4,
            )
            eng.add_request(eng.make_request(inp))
        eng.step()  # one runs (max_num_seqs 1), two wait with their whole prompts
        stats = EngineStats.of(eng)
        assert (
            stats.waiting == 2
            and stats.waiting_tokens == sum(r.num_tokens for r in eng.scheduler.waiting) > 0
        )
        assert autoscaling_stats(stats.as_dict())["waiting_tokens"] == float(stats.waiting_tokens)
        while eng.has_unfinished:
            eng.step()
    finally:
        eng.shutdown()
