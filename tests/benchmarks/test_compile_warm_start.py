"""benchmarks/compile_warm_start.py: what a pass times, how its figures are derived, what it refuses."""

import pytest

from mgtq.sampling import SamplerConfig


@pytest.fixture(scope="module")
def script(benchmark_script):
    return benchmark_script("compile_warm_start")


def test_a_sampler_pass_is_the_full_step_and_each_local_set_of_the_schedule(script, benchmark_script):
    from mgtq.bench.source import resolve_model
    from mgtq.models.presets import build_transformer

    reuse = benchmark_script("bench_reuse")
    source = resolve_model("tiny-shapes")
    calls = script.step_calls(build_transformer("tiny-shapes"), source, "fast", 16)
    plan = reuse.schedule_plan(SamplerConfig.preset("fast", num_steps=16), (16, 16))
    sets = reuse.local_sets(plan)
    assert [name for name, _ in calls] == ["full", *(f"local{k}" for k in range(len(sets)))]
    assert sum(s["steps"] for s in sets) == sum(not entry["full"] for entry in plan) and len(sets) > 1
    assert [name for name, _ in script.step_calls(None, source, None, 16)] == ["forward"]


def test_summary_figures(script):
    record = {"first_pass_s": {"full": 10.0, "local0": 5.0}, "passes_s": [{"full": 2, "local0": 1},
                                                                          {"full": 3, "local0": 1},
                                                                          {"full": 9, "local0": 1}],
              "versus_plain": [{"full": (2.0, 4.0), "local0": (1.0, 2.0)}, {"full": (3.0, 3.0), "local0": (1.0, 1.0)}]}
    out = script.summarize(record)
    assert out["compile_s"] == 15.0 - 4.0  # first pass − median steady pass
    assert out["versus_plain_ratio"] == {"median": 0.75, "min": 0.5, "max": 1.0}
    report = {"model": "m", "threads": 1, "sampler": "fast", "steps": 48, "command": "c", "loadavg_start": [0],
              "loadavg_end": [0], "formats": {"scq": {"warm": {**out, "plain_first_pass_s": {"full": 7.0},
                                                               "fxgraph_cache": {}}}}}
    text = script.to_markdown(report)
    assert "0.750× [0.500–1.000]" in text and "one 48-step image, sampler fast" in text


@pytest.mark.parametrize("sampler, message", [("vanilla", "no context reuse"), ("nope", "unknown sampler preset")])
def test_a_sampler_without_context_reuse_is_refused(script, capsys, sampler, message):
    with pytest.raises(SystemExit):
        script.main(["--sampler", sampler])
    assert message in capsys.readouterr().err


def test_a_tome_pass_merges_three_different_token_counts(script):
    import torch

    from mgtq.bench.source import resolve_model
    from mgtq.merging.patch import merge_count
    from mgtq.merging import TomeConfig
    from mgtq.models.presets import build_transformer

    source = resolve_model("tiny-shapes")
    model = build_transformer("tiny-shapes").to(torch.bfloat16).eval()  # the bench's inputs are bf16
    seen = []
    calls = script.step_calls(model, source, None, 16, tome=0.5)
    assert [name for name, _ in calls] == ["tome0.75", "tome0.5", "tome0.25"]
    original = model.forward

    def recording(hidden_states, *args, token_hook=None, **kwargs):
        plan = token_hook.bind(model_grid, hidden_states == model.mask_token_id)
        seen.append(round(float(plan.masked_fraction.mean()), 2))
        return original(hidden_states, *args, token_hook=token_hook, **kwargs)

    from mgtq.bench.source import token_grid

    h, w = token_grid(source)
    model_grid = (h // model.grid_factor, w // model.grid_factor)
    model.forward = recording
    with torch.inference_mode():
        for _, fn in calls:
            fn()
    assert seen == [0.75, 0.5, 0.25]
    counts = {merge_count(TomeConfig(ratio=0.5), model_grid[0] * model_grid[1], s) for s in seen}
    assert len(counts) == 3
    with pytest.raises(SystemExit):
        script.main(["--tome", "0.5", "--sampler", "fast"])
