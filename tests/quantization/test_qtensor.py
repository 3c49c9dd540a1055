"""mgtq.quantization.qtensor: the group-size rule every config and the manifest share."""

import pytest

from mgtq.quantization.qtensor import check_group_size


@pytest.mark.parametrize("value", [None, 2, 32, 64, 128, 96])
def test_a_group_size_may_be_none_or_an_even_integer_of_two_or_more(value):
    check_group_size(value, "W4A16Config.group_size")


@pytest.mark.parametrize("value", [0, 1, 3, 33, -2])
def test_any_other_group_size_is_refused_naming_the_setting_and_the_way_out(value):
    with pytest.raises(ValueError, match=rf"^qat.group_size must be null \(one scale per output channel\) or an even "
                                         rf"integer ≥ 2 such as 32, 64 or 128, got {value}$"):
        check_group_size(value, "qat.group_size", none="null")
