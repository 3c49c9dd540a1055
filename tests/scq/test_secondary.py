"""mgtq.scq.secondary: the W4A8 layers are exactly the chosen fraction of the magnitudes."""

from mgtq.quantization.selection import select_a8_layers


def test_a8_set_is_exactly_the_lowest_fraction():
    mags = {f"l{i}": float(v) for i, v in enumerate([5, 1, 9, 3, 7, 2, 8, 4, 6])}
    assert select_a8_layers(mags, 1 / 3, "lowest") == ["l1", "l3", "l5"]
    assert select_a8_layers(mags, 1.0, "all") == sorted(mags)
    rnd = select_a8_layers(mags, 1 / 3, "random", seed=1)
    assert len(rnd) == 3 and rnd == select_a8_layers(mags, 1 / 3, "random", seed=1)
    assert select_a8_layers(mags, 0.0, "lowest") == []
