"""mgtq.ptq: what `mgtq quantize` calibrates on."""

import pytest

from mgtq.ptq import calibration_prompts
from mgtq.shapes.shapebench import CATEGORIES, shapebench_prompts


def test_calibration_prompts_are_val_prompts_of_every_category_in_turn():
    # the val list is category after category: its first 32 were one-object prompts only
    by_category = {c: [it.prompt for it in shapebench_prompts(64, split="val") if it.category == c] for c in CATEGORIES}
    expected = [by_category[CATEGORIES[i % len(CATEGORIES)]][i // len(CATEGORIES)] for i in range(320)]
    assert calibration_prompts(32) == expected[:32]
    assert calibration_prompts(7) == expected[:7] and calibration_prompts(320) == expected
    for bad in (0, 321):
        with pytest.raises(ValueError, match="between 1 and 320"):
            calibration_prompts(bad)
