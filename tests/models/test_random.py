"""mgtq.models.random: random float and quantized transformers of a preset."""

from __future__ import annotations

import torch
from torch import nn

from mgtq.bench.build import a8_layers_for
from mgtq.bench.memory import module_storage_nbytes, transformer_weight_nbytes
from mgtq.models import preset_config
from mgtq.models.random import random_float_transformer, random_quantized_transformer
from mgtq.quantization import linear_names


def test_random_quantized_model_is_packed_and_float_parts_stay_bf16():
    config = preset_config("test-micro")
    bf16 = random_float_transformer(config, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    names = linear_names(bf16)
    a8 = a8_layers_for("scq", names, seed=0)
    assert len(a8) == round(len(names) / 3)
    scq = random_quantized_transformer(config, a8, {n: 0.01 for n in a8})
    assert not any(isinstance(m, nn.Linear) for m in scq.modules())
    assert scq.embed.embeddings.weight.dtype == torch.bfloat16
    assert transformer_weight_nbytes(scq)[0] < transformer_weight_nbytes(bf16)[0]
    assert transformer_weight_nbytes(scq)[0] == module_storage_nbytes(scq)
