"""Context reuse for masked generative transformers (ReCAP arXiv 2505.19089, MARché arXiv 2506.12035).

`cache` is the model side: the keys/values of a full step and the token plans of full and local
steps, through the model's one token hook (mgtq.models.hooks); `config` holds ReuseConfig. The
sampler side (when full steps run, which tokens the local ones compute) is in mgtq.sampling.maskgit
and mgtq.sampling.tricks.reuse.
"""

from mgtq.reuse.cache import ContextCache, active_tokens, padded_indices

__all__ = ["ContextCache", "active_tokens", "padded_indices"]
