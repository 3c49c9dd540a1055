"""benchmarks/bench_timing.py: every variant once per round, the order rotated, ratios per round."""

import pytest


def _recorder():
    calls = []
    return calls, {name: (lambda name=name: calls.append(name)) for name in "abc"}


def test_every_variant_once_per_round_each_first_in_turn(benchmark_script):
    timing = benchmark_script("bench_timing")
    calls, fns = _recorder()
    samples = timing.interleaved_rounds(fns, rounds=4, warmup=2)
    assert calls[:6] == list("aabbcc")  # warm-up calls first, untimed
    assert calls[6:] == list("abc" "bca" "cab" "abc")
    assert {n: len(s) for n, s in samples.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for s in samples.values() for t in s)


def test_fixed_order_when_not_rotated(benchmark_script):
    timing = benchmark_script("bench_timing")
    calls, fns = _recorder()
    timing.interleaved_rounds(fns, rounds=2, rotate=False)
    assert calls == list("abcabc")


def test_spread_takes_ratios_round_by_round(benchmark_script):
    timing = benchmark_script("bench_timing")
    # round 2 is slow for both (drift): per-round ratios stay 0.5, a ratio of medians would not see the pairing
    s = timing.spread({"base": [10.0, 40.0, 12.0], "new": [5.0, 20.0, 6.0]}, base="base")
    assert s["ms"] == {"base": 12.0, "new": 6.0} and s["ms_min"]["new"] == 5.0 and s["ms_max"]["base"] == 40.0
    assert s["ratio"] == {"base": 1.0, "new": 0.5} and s["ratio_min"]["new"] == s["ratio_max"]["new"] == 0.5
    assert "ratio" not in timing.spread({"base": [1.0]})


def test_bad_counts_are_refused(benchmark_script):
    timing = benchmark_script("bench_timing")
    with pytest.raises(ValueError, match="rounds"):
        timing.interleaved_rounds({"a": lambda: None}, rounds=0)
