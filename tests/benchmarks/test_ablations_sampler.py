"""benchmarks/ablations_sampler.py: each row's paired difference against vanilla, also in a re-rendered file."""

import pytest


def test_rows_carry_the_paired_difference_against_vanilla(benchmark_script):
    ablations, paired = benchmark_script("ablations_sampler"), benchmark_script("paired")
    base = ablations.vanilla_at(ablations.SamplerConfig(), 16)
    noise = base.with_overrides({"noise.curve": "abs_cos"})
    vanilla_ok, noise_ok = [True, True, False, False, True], [True, False, True, True, True]
    def measured(ok):
        return {"accuracy": sum(ok) / 5, "per_category": {}, "nfe": 16, "seconds": 1.0, "ok": ok}

    evaluations = {ablations.setting_key(base): measured(vanilla_ok), ablations.setting_key(noise): measured(noise_ok)}
    rows = ablations.table_rows({"noise": [("noise abs_cos", noise)]}, evaluations, base)
    row = rows["noise"][0]
    assert (row["wins"], row["losses"]) == (2, 1)
    assert row["paired_vs_vanilla"] == paired.paired_difference(vanilla_ok, noise_ok)
    data = {"split": "test", "n": 5, "model": "m", "commands": ["c"], "base_sampler": base.to_dict(),
            "evaluations": evaluations, "groups": {"noise": [{k: v for k, v in row.items() if k != "paired_vs_vanilla"},
                                                             {**row, "label": "older", "carried_over": True}]}}
    rendered = ablations.with_paired(data)["groups"]["noise"]  # a file written before the column: found by sampler
    assert rendered[0] == row and rendered[1]["paired_vs_vanilla"] is None
    table = ablations.to_markdown(ablations.with_paired(data))
    assert f"| 2 / 1 | {paired.paired_cell(row['paired_vs_vanilla'])} |" in table
    assert "| older * | 16 | 16 | 0.800 | 0.600 | 2 / 1 | n/a (no per-prompt verdicts) |" in table
    data["groups"]["noise"][0]["wins"] = 3  # verdicts that do not give the row's wins: the wrong evaluation was found
    with pytest.raises(ValueError, match="the row says 3 / 1"):
        ablations.with_paired(data)
