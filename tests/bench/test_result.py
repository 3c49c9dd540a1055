"""mgtq.bench.result: the result record is strict."""

from __future__ import annotations

import pytest

from mgtq.bench.result import CaseResult


def test_result_record_is_strict():
    good = CaseResult(label="bf16", target="bf16", kind="mgtq").to_dict()
    assert CaseResult.from_dict(good) == CaseResult(label="bf16", target="bf16", kind="mgtq")
    with pytest.raises(ValueError, match="unknown key.*goals"):
        CaseResult.from_dict({**good, "goals": []})
    with pytest.raises(ValueError, match="status"):
        CaseResult.from_dict({**good, "status": "fine"})
    with pytest.raises(ValueError, match="without a message"):
        CaseResult.from_dict({**good, "status": "failed"})
