"""mgtq.bench.memory: weight bytes of packed, grouped and tensor-subclass layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mgtq.bench.build import a8_layers_for
from mgtq.bench.memory import module_storage_nbytes, storage_nbytes, transformer_weight_nbytes
from mgtq.models import preset_config
from mgtq.models.random import random_float_transformer, random_quantized_transformer
from mgtq.quantization import W4Linear, linear_names


def test_w4_linear_counts_about_an_eighth_of_fp32():
    linear = nn.Linear(1024, 512, bias=False)
    fp32 = transformer_weight_nbytes(linear)[0]
    assert fp32 == 1024 * 512 * 4
    packed = nn.Sequential(W4Linear.from_float(linear))
    nbytes, method = transformer_weight_nbytes(packed)
    assert "model_weight_nbytes" in method
    # int4 = 1/8 of fp32, plus one fp32 scale per output channel
    assert nbytes == 1024 * 512 // 2 + 512 * 4
    assert 0.12 < nbytes / fp32 < 0.13
    assert module_storage_nbytes(packed) == nbytes


def test_grouped_formats_add_exactly_their_group_scales():
    from mgtq.bench.formats import FORMATS, Format

    assert all(Format.parse(f).scheme for f in FORMATS)  # every format describes itself in the report
    assert Format.parse("scq-g64") == Format("scq-g64", "scq", 64, False)
    assert Format.parse("w4a8-cached") == Format("w4a8-cached", "w4a8", None, True)
    with pytest.raises(ValueError, match="unknown format 'w4a8-g64'"):
        Format.parse("w4a8-g64")  # A8 layers stay per channel: no grouped w4a8
    config = preset_config("test-micro")
    names = linear_names(random_float_transformer(config, torch.bfloat16))
    a8 = a8_layers_for("scq", names, seed=0)
    scales = {n: 0.01 for n in a8}
    per_channel = random_quantized_transformer(config, a8, scales)
    grouped = random_quantized_transformer(config, a8, scales, group_size=16)
    a16 = [grouped.get_submodule(n) for n in names if n not in a8]
    assert all(m.weight_scale.shape == (m.out_features, m.in_features // 16) for m in a16)
    assert all(grouped.get_submodule(n).weight_scale.shape[1] == 1 for n in a8)
    extra = sum(m.out_features * (m.in_features // 16 - 1) * 4 for m in a16)  # fp32 scales
    assert transformer_weight_nbytes(grouped)[0] == transformer_weight_nbytes(per_channel)[0] + extra
    with pytest.raises(ValueError, match="group_size 6 must divide"):
        random_quantized_transformer(config, set(), None, group_size=6)
    with pytest.raises(ValueError, match="group_size must be null .* an even integer ≥ 2 .*got 7"):
        random_quantized_transformer(config, set(), None, group_size=7)  # the manifest's rule, as a load's


def test_storage_of_tensor_subclasses_counts_inner_tensors():
    from torchao.quantization import IntxWeightOnlyConfig, PerAxis, quantize_

    model = nn.Sequential(nn.Linear(256, 128)).to(torch.bfloat16)
    quantize_(model, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerAxis(0)))
    weight = model[0].weight
    assert type(weight) is not nn.Parameter
    # torchao stores int4 one value per byte on x86: about numel bytes, not numel / 2
    assert 256 * 128 <= storage_nbytes(weight) < 256 * 128 * 1.2
    nbytes, method = transformer_weight_nbytes(model)
    assert "__tensor_flatten__" in method and nbytes >= storage_nbytes(weight)


# ----------------------------------------------------------------------------- off Linux (Windows)
def test_peak_rss_on_windows_is_the_peak_working_set(monkeypatch):
    import collections
    import sys
    import types

    from mgtq.bench import memory

    monkeypatch.setattr(memory, "_status_kib", lambda field: None)  # no /proc
    monkeypatch.setattr(memory, "_WINDOWS", True)
    monkeypatch.setitem(sys.modules, "resource", None)  # Windows has no resource module
    pmem = collections.namedtuple("pmem", "rss vms peak_wset wset")  # psutil's on Windows (fields trimmed)
    process = types.SimpleNamespace(memory_info=lambda: pmem(10, 20, 4_000_000, 3_000_000))
    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(Process=lambda: process))
    assert memory.peak_rss_bytes() == 4_000_000


def test_a_figure_the_system_cannot_give_is_recorded_as_unavailable(monkeypatch):
    import os
    import sys

    from mgtq.bench import memory

    monkeypatch.delattr(os, "getloadavg")  # Windows has none
    assert memory.loadavg() is None
    monkeypatch.setattr(memory, "_status_kib", lambda field: None)
    monkeypatch.setitem(sys.modules, "resource", None)  # a system with neither /proc nor resource
    assert memory.peak_rss_bytes() is None
    phases = memory.PhasePeaks()
    with phases.phase("sampling"):
        pass
    assert phases.peaks == {"sampling": None} and phases.overall is None
    assert memory.highest(None, 5, None, 7) == 7 and memory.highest(None, None) is None


def test_the_bench_imports_without_resource():
    import os
    import subprocess
    import sys

    # As on Windows: torch and the libraries take their own platform's branches, then mgtq sees no resource.
    code = ("import sys, torch, diffusers, transformers; sys.modules['resource'] = None; "
            "import mgtq.bench.runner, mgtq.bench.case, mgtq.bench.memory")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
