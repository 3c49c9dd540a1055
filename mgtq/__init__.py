"""mgtq: compression toolkit for masked generative transformers (Meissonic first).

    import mgtq
    pipe = mgtq.load()                                # the embedded tiny-shapes model, or a folder path
    image = pipe("a red circle", seed=0).images[0]
    mgtq.quantize_(pipe, mgtq.W4A16Config(group_size=64))   # post-training quantization, in place
    pipe.save_pretrained("my-w4a16")                  # a complete mgtq checkpoint
"""

__version__ = "0.1.0"

import logging as _logging

# torchao (pulled in by diffusers) logs a warning per optional CUDA/CUTLASS library it cannot find
# on CPU-only machines, and torch warns about its enum registrations; neither concerns mgtq users.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

# Heavy imports (torch, diffusers, transformers) happen on first use, so `mgtq --help` is instant.
_LAZY = {
    "MeissonicTransformer": "mgtq.models",
    "MGTPipeline": "mgtq.pipeline",
    "MGTPipelineOutput": "mgtq.pipeline",
    "MGTInpaintPipeline": "mgtq.editing",
    "MGTImg2ImgPipeline": "mgtq.editing",
    "outpaint_canvas": "mgtq.editing",
    "load": "mgtq.pipeline",
    "SamplerConfig": "mgtq.sampling",
    "quantize_": "mgtq.quantization.api",
    "W4A16Config": "mgtq.quantization.api",
    "W4A8Config": "mgtq.quantization.api",
    "SCQConfig": "mgtq.quantization.api",
    "calibrate_activations": "mgtq.quantization.api",
    "TomeConfig": "mgtq.merging.patch",
    "apply_tomemgt": "mgtq.merging.patch",
    "remove_tomemgt": "mgtq.merging.patch",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mgtq' has no attribute {name!r}")


__all__ = [*_LAZY, "__version__"]
