"""The upper bounds mgtq accepts for sizes and scales, and why each is where it is.

A value past one of these is refused when it is read (CLI flag, recipe, sampler config, model_index.json)
with a one-line error, instead of allocating until the machine stops or overflowing to NaN mid-run.
Meissonic-1024 is the reference: a 1024 px image is a 64×64 grid of VQ tokens (f = 16), 4096 tokens.
"""

# Each sampling step decodes at least one masked token, so steps beyond the token count of the largest
# grid the model is meant for (Meissonic-1024: 64×64 = 4096) cannot change the image.
MAX_STEPS = 4096

# Image side in pixels: 4× Meissonic's trained 1024 (a 256×256 token grid, 65 536 tokens). Its logits alone
# are 65 536 × 8192 codes × 4 B = 2 GiB per image and CFG pass; a larger side fits no consumer GPU.
MAX_RESOLUTION = 4096

# CFG ℓ = ℓu + s(ℓc − ℓu) and noise ℓ + α·ε scale the logits: 100 is 11× the official Meissonic CFG (9) and
# 50× the official demo's noise scale (2), and keeps any logit gap under 650 inside float16's range (65 504).
MAX_GUIDANCE = 100.0
MAX_NOISE_SCALE = 100.0

# Images written by one `mgtq generate` (they are sampled in one batch: memory grows with the count).
MAX_IMAGES = 1024

# Calibration prompts of an SCQ recipe: the synthesis stage generates and stores one image per prompt, and
# the paper calibrates on hundreds; the bound stops a typo (10**12) before the prompt list is built.
MAX_PROMPTS = 100_000
