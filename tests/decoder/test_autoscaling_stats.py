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
