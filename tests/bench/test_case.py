"""mgtq.bench.case: one timed image, with offload freeing the transformer before the decoder loads."""

from __future__ import annotations

import weakref


def test_offload_frees_the_transformer_before_the_decoder_is_loaded():
    from mgtq.bench.case import timed_image
    from mgtq.bench.memory import PhasePeaks
    from testkit import build_random_pipeline

    pipe = build_random_pipeline("test-micro", resolution=32, text_max_length=16)
    vq = pipe.vqvae
    alive = weakref.ref(pipe.transformer)
    seen = {}

    def load_vq():
        seen["transformer_alive_at_vq_load"] = alive() is not None
        return vq

    phases = PhasePeaks()
    image, freed, images = timed_image(pipe, steps=1, phases=phases, load_vq=load_vq)
    assert freed and seen == {"transformer_alive_at_vq_load": False}
    assert set(phases.peaks) == {"sampling", "decode"} and phases.overall > 0
    assert pipe.transformer is None and len(images) == 1
    assert image["vq_load_s"] is not None and image["steps"] == 1
