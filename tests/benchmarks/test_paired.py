"""benchmarks/paired.py: the paired accuracy difference of two settings, its interval and McNemar's exact p."""

import pytest


@pytest.fixture(scope="module")
def paired(benchmark_script):
    return benchmark_script("paired")


def table(both: int, b_only: int, a_only: int, neither: int) -> tuple[list[bool], list[bool]]:
    """Verdict lists (a, b) with the given 2×2 counts (Newcombe's e, f, g, h with b as his first proportion)."""
    a = [True] * both + [False] * b_only + [True] * a_only + [False] * neither
    b = [True] * both + [True] * b_only + [False] * a_only + [False] * neither
    return a, b


@pytest.mark.parametrize("counts, low, high", [
    # Newcombe (1998), Statistics in Medicine 17:2635-2650, Table II, method 10, to the 4 decimals published
    ((36, 12, 2, 0), 0.0569, 0.3404),
    ((18, 12, 2, 18), 0.0562, 0.3290),
    ((53, 0, 0, 1), -0.0729, 0.0729),
    ((0, 30, 0, 0), 0.8395, 1.0),
])
def test_newcombe_method_10_published_examples(paired, counts, low, high):
    a, b = table(*counts)
    result = paired.paired_difference(a, b)
    assert result["diff"] == pytest.approx((counts[1] - counts[2]) / sum(counts))
    assert result["ci"] == pytest.approx([low, high], abs=5e-5)
    assert (result["b_only"], result["a_only"], result["n"]) == (counts[1], counts[2], sum(counts))


def test_the_difference_is_b_minus_a(paired):
    a, b = table(36, 12, 2, 0)
    forward, backward = paired.paired_difference(a, b), paired.paired_difference(b, a)
    assert backward["diff"] == -forward["diff"] and backward["ci"] == pytest.approx([-x for x in forward["ci"][::-1]])
    assert (backward["a_only"], backward["b_only"]) == (forward["b_only"], forward["a_only"])
    assert backward["p"] == forward["p"]


def test_mcnemar_exact_p_by_hand(paired):
    # two-sided binomial test of the discordant prompts against a fair coin
    assert paired.mcnemar_exact(0, 5) == 2 / 2 ** 5
    # P(X ≤ 1) for X ~ Bin(10, 1/2), doubled
    assert paired.mcnemar_exact(9, 1) == paired.mcnemar_exact(1, 9) == 2 * (1 + 10) / 2 ** 10
    assert paired.mcnemar_exact(3, 3) == 1.0 and paired.mcnemar_exact(0, 0) == 1.0


def test_identical_verdicts_differ_by_nothing(paired):
    ok = [True, False, True, True, False] * 20
    result = paired.paired_difference(ok, ok)
    assert (result["diff"], result["a_only"], result["b_only"], result["p"]) == (0.0, 0, 0, 1.0)
    low, high = result["ci"]
    assert low < 0 < high  # no discordant prompt on 100 is not proof of equality: the interval keeps a width
    assert paired.paired_cell(result) == f"+0.000 [{low:+.3f}, {high:+.3f}]"


def test_all_discordant_one_way(paired):
    result = paired.paired_difference([False] * 10, [True] * 10)
    assert (result["diff"], result["a_only"], result["b_only"]) == (1.0, 0, 10)
    assert result["ci"][1] == 1.0 and 0.5 < result["ci"][0] < 1.0
    assert result["p"] == 2 / 2 ** 10


def test_mismatched_or_empty_verdicts_are_errors(paired):
    with pytest.raises(ValueError, match="same prompts: 3 against 2"):
        paired.paired_difference([True, False, True], [True, False])
    with pytest.raises(ValueError, match="no prompts"):
        paired.paired_difference([], [])


def test_a_result_without_verdicts_says_so(paired):
    assert paired.paired_or_none(None, [True]) is None and paired.paired_or_none([True], None) is None
    assert paired.paired_cell(None) == paired.NO_VERDICTS == "n/a (no per-prompt verdicts)"
    assert paired.paired_or_none([True, False], [True, True])["b_only"] == 1
