"""mgtq: compression toolkit for masked generative transformers (Meissonic first).

    import mgtq
    pipe = mgtq.load("checkpoints/tiny-shapes")      # float or quantized checkpoint
    image = pipe("a red circle", seed=0).images[0]
"""

__version__ = "0.1.0"

import logging as _logging

# torchao (pulled in by diffusers) logs a warning per optional CUDA/CUTLASS library it cannot find
# on CPU-only machines, and torch warns about its enum registrations; neither concerns mgtq users.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)

from mgtq.models import MeissonicTransformer  # noqa: E402
from mgtq.pipeline import MGTPipeline, MGTPipelineOutput, load  # noqa: E402
from mgtq.sampling import SamplerConfig  # noqa: E402

__all__ = ["MeissonicTransformer", "MGTPipeline", "MGTPipelineOutput", "SamplerConfig", "load", "__version__"]
