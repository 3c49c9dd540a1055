"""benchmarks/reuse_quality.py: setting names map onto sampler and TomeMGT configs; unknown ones are errors."""

from pathlib import Path

import pytest

from mgtq.merging import TomeConfig
from mgtq.reuse.config import ReuseConfig
from mgtq.sampling import SamplerConfig


@pytest.fixture(scope="module")
def quality(benchmark_script):
    return benchmark_script("reuse_quality")


def test_setting_names(quality):
    base = SamplerConfig(num_steps=16)
    assert quality.parse_setting("none", base) == (base, None)
    assert quality.parse_setting("steps-8", base)[0].num_steps == 8
    assert quality.parse_setting("tome", base) == (base, TomeConfig())
    sampler, tome = quality.parse_setting("reuse-3-cells-w2", base)
    assert tome is None and sampler.reuse == ReuseConfig(interval=3, group="cells", warmup=2)
    sampler, _ = quality.parse_setting("reuse-3-cells-w2-r0.1", base)
    assert sampler.reuse == ReuseConfig(interval=3, group="cells", warmup=2, refresh=0.1)
    assert quality.parse_setting("reuse-3-cells-w2-tome", base) == (quality.parse_setting("reuse-3-cells-w2", base)[0],
                                                                   TomeConfig())
    for bad in ("reuse-x", "steps", "reuse-3-fast", "fast", "reuse-3-r2", "reuse-3-rx", "reuse-3-tome-w2", "tome-reuse-3"):
        with pytest.raises(ValueError, match="unknown setting"):
            quality.parse_setting(bad, base)


def test_a_rerun_keeps_the_settings_it_measured(quality, tmp_path, monkeypatch):
    out = tmp_path / "q.json"
    assert quality.main(["--limit", "2", "--threads", "1", "--settings", "none,steps-8", "--json", str(out)]) == 0
    first = quality.read_json(out)["settings"]
    # each prompt's verdict is kept, so two settings can be compared prompt by prompt
    assert all(len(row["ok"]) == 2 and all(isinstance(ok, bool) for ok in row["ok"]) for row in first.values())
    assert first["none"]["overall"] == sum(first["none"]["ok"]) / 2
    measured = []
    real = quality.evaluate_pipeline
    monkeypatch.setattr(quality, "evaluate_pipeline",
                        lambda pipe, limit, sampler, **kw: measured.append(sampler.num_steps) or real(pipe, limit, sampler, **kw))
    assert quality.main(["--limit", "2", "--threads", "1", "--settings", "none,steps-8,steps-6", "--json", str(out)]) == 0
    again = quality.read_json(out)["settings"]
    assert measured == [6]  # none and steps-8 kept; only the new setting ran, against none's saved tokens
    assert again["steps-8"] == first["steps-8"] and set(again) == {"none", "steps-8", "steps-6"}
    assert 0.0 <= again["steps-6"]["token_agreement"] < 1.0


def test_steps_and_prompts_per_category_are_part_of_what_a_rerun_keeps(quality, tmp_path):
    out = tmp_path / "q.json"
    assert quality.main(["--limit", "2", "--threads", "1", "--steps", "4", "--settings", "none", "--json", str(out)]) == 0
    data = quality.read_json(out)
    assert data["base_sampler"]["num_steps"] == 4 and data["settings"]["none"]["nfe"] == 4
    assert quality.main(["--limit", "2", "--threads", "1", "--steps", "4", "--per-category", "2", "--settings", "none",
                         "--json", str(out)]) == 0
    again = quality.read_json(out)
    assert again["identity"]["per_category"] == 2 and again["identity"] != data["identity"]


def test_a_run_with_other_kernels_starts_over(quality, tmp_path, monkeypatch):
    # A quantized model's scores follow the CPU class's kernels: settings measured on another class are not kept.
    out = tmp_path / "q.json"
    run = ["--limit", "2", "--threads", "1", "--steps", "4", "--settings", "none", "--json", str(out)]
    assert quality.main(run) == 0
    first = quality.read_json(out)
    assert first["identity"]["kernels"]["cpu_class"] == quality.describe_kernels("cpu")["cpu_class"]
    assert "Kernels: cpu " in out.with_suffix(".md").read_text()
    other = {**first["identity"]["kernels"], "cpu_class": "another-class"}
    monkeypatch.setattr(quality, "describe_kernels", lambda device: other)
    measured = []
    real = quality.evaluate_pipeline
    monkeypatch.setattr(quality, "evaluate_pipeline", lambda pipe, limit, sampler, **kw:
                        measured.append(sampler.num_steps) or real(pipe, limit, sampler, **kw))
    assert quality.main(run) == 0
    assert measured == [4] and quality.read_json(out)["identity"]["kernels"] == other


def test_the_committed_16x16_test_run_still_reproduces_token_for_token():
    # The README's ShapeBench figures must come out of a fresh run: the tokens the 16×16 model's plain
    # sampler gave the first 16 test prompts in the committed run (benchmarks/results/
    # reuse_quality_test_float_16x16.json; kept in tests/fixtures) are regenerated. A change to the
    # forward or the sampler that moves them must re-run the evaluations.
    from safetensors.torch import load_file

    from mgtq.default_model import model_folder
    from mgtq.evaluation import evaluate_pipeline
    from mgtq.pipeline import MGTPipeline

    stored = Path(__file__).resolve().parents[1] / "fixtures" / "shapebench_test_first16_tiny-shapes-16x16_tokens.safetensors"
    reference = load_file(stored)["tokens"][:16]
    pipe = MGTPipeline.from_pretrained(model_folder("tiny-shapes-16x16"))
    result = evaluate_pipeline(pipe, 16, progress=False, split="test", reference_tokens=reference)  # its batches of 16
    assert result["token_agreement"] == 1.0


def test_render_adds_paired_comparisons_from_the_json_alone(quality, benchmark_script, tmp_path, monkeypatch):
    def setting(name, nfe, token_nfe, ok=None):
        return {"name": name, "overall": 0.5, "token_agreement": 1.0, "nfe": nfe, "local_nfe": 0,
                "token_nfe": token_nfe, **({"ok": ok} if ok is not None else {})}

    settings = [setting("none", 16, 16.0, [True, True, True, False]),
                setting("steps-11", 11, 11.0, [True, False, True, False]),
                setting("steps-12", 12, 12.0, [True, True, False, False]),
                setting("tome", 16, 16.0),  # an older row: no `ok`
                setting("reuse-4-cells-w5", 16, 11.5, [True] * 4), setting("reuse-2", 16, 13.0, [True] * 4)]
    out = tmp_path / "q.json"
    quality.write_json(out, {"split": "val", "n": 4, "model": "embedded default",
                             "settings": {s["name"]: s for s in settings},
                             "command": "python benchmarks/reuse_quality.py --settings steps-11,steps-12,tome,"
                                        "reuse-4-cells-w5,reuse-2 --json q.json"})
    monkeypatch.setattr(quality.MGTPipeline, "from_pretrained", lambda *a, **k: pytest.fail("--render generated"))
    assert quality.main(["--json", str(out), "--render"]) == 0
    rows = quality.read_json(out)["settings"]
    fast = rows["reuse-4-cells-w5"]
    assert fast["fewer_steps_at_cost"] == "steps-12"  # the cheapest steps-N costing at least its 11.5 token NFE
    assert fast["paired_vs_none"] == benchmark_script("paired").paired_difference([True, True, True, False], [True] * 4)
    assert fast["paired_vs_steps-12"]["b_only"] == 2 and fast["paired_vs_steps-12"]["a_only"] == 0
    assert rows["reuse-2"]["fewer_steps_at_cost"] is None  # no steps-N at 13 token NFE or more in this run
    assert rows["tome"]["paired_vs_none"] is None and "paired_vs_none" not in rows["none"]
    table = out.with_suffix(".md").read_text().splitlines()
    names = [line.split(" | ")[0][2:] for line in table if line.startswith("| ") and " | 0.500 | " in line]
    assert names == ["none", "steps-11", "steps-12", "tome", "reuse-4-cells-w5", "reuse-2"]  # the order asked for
    assert f"| steps-12: {quality.paired_cell(fast['paired_vs_steps-12'])} |" in table[-2]
    assert "no steps-N at its cost in this run" in table[-1]
    assert next(line for line in table if line.startswith("| tome ")).count("n/a (no per-prompt verdicts)") == 1
