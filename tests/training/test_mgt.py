"""Warm starts of mgtq.training.mgt across transformer layouts."""

from pathlib import Path

import pytest
import torch

from mgtq.models.presets import preset_config
from mgtq.models.transformer import MeissonicTransformer
from mgtq.pipeline import MGTPipeline
from mgtq.training.mgt import MGTTrainConfig, _warm_start, build_models

SHIPPED = Path(__file__).resolve().parents[2] / "checkpoints" / "tiny-shapes"


def _fresh(preset: str, **overrides):
    source = MGTPipeline.from_pretrained(SHIPPED)
    return build_models(MGTTrainConfig(transformer_preset=preset, transformer_overrides=overrides), source.tokenizer,
                        codebook_size=256) + (source,)


def test_layout_without_compression_reuses_every_weight_but_the_compression_convs():
    transformer, text_encoder, source = _fresh("tiny-shapes-16x16")
    record = _warm_start(transformer, text_encoder, source.tokenizer, SHIPPED)
    target = transformer.state_dict()
    assert record["reused"] == len(target)
    assert record["dropped"] and all(k.startswith(("down_block.", "up_block.")) for k in record["dropped"])
    shipped = source.transformer.state_dict()
    assert all(torch.equal(target[k], shipped[k]) for k in target)
    assert all(torch.equal(v, source.text_encoder.state_dict()[k]) for k, v in text_encoder.state_dict().items())
    # and the warm-started model runs at 4x the tokens: the 16x16 VQ grid in every block
    tokens = torch.randint(0, 256, (1, 16, 16))
    seen = []
    transformer.transformer_blocks[0].register_forward_hook(lambda m, a, out: seen.append(out[1].shape[1]))
    with torch.no_grad():
        transformer(hidden_states=tokens, encoder_hidden_states=torch.zeros(1, 4, 128),
                    pooled_projections=torch.zeros(1, 128), timestep=torch.ones(1), micro_conds=torch.zeros(1, 5))
    assert seen == [256]


def test_warm_start_refuses_other_shapes():
    _, text_encoder, source = _fresh("tiny-shapes")
    bigger = MeissonicTransformer(**preset_config("tiny-shapes", joint_attention_dim=64))
    with pytest.raises(ValueError, match="other shapes"):
        _warm_start(bigger, text_encoder, source.tokenizer, SHIPPED)


def test_elapsed_time_carries_over_a_resume(tmp_path):
    from mgtq.training.mgt import _elapsed_before

    log = tmp_path / "log.jsonl"
    assert _elapsed_before(log, 500) == 0.0
    log.write_text('{"step": 250, "loss": 2.0, "elapsed_s": 300.0}\n{"step": 500, "loss": 1.9, "elapsed_s": 610.5}\n'
                   '{"step": 750, "loss": 1.8, "elapsed_s": 905.0}\n')
    assert _elapsed_before(log, 0) == 0.0  # a fresh start
    assert _elapsed_before(log, 500) == 610.5  # resumed from the step-500 state: the later line is not counted
    assert _elapsed_before(log, 750) == 905.0
