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


def test_a_failed_case_is_summed_up_by_its_error_line():
    from mgtq.bench.result import message_line

    traceback = ("case failed: Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                 "    load(path)\nValueError: q/transformer/diffusion_pytorch_model.safetensors: sha256 differs; "
                 "re-export the checkpoint\n")
    assert message_line(traceback) == ("case failed: ValueError: q/transformer/diffusion_pytorch_model.safetensors: "
                                       "sha256 differs; re-export the checkpoint")
    assert message_line("peer needs a CUDA GPU\nmore") == "peer needs a CUDA GPU"
