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

# CFG ℓ = ℓu + s(ℓc − ℓu) and noise ℓ + α·ε scale logits; Meissonic's logits stay within |ℓ| ≈ 300, so with
# s, α ≤ 100 the guided logits stay far inside float16's range (65 504) and every softmax is finite.
# The papers use s ≤ 20 and α ≤ 2.
MAX_GUIDANCE = 100.0
MAX_NOISE_SCALE = 100.0

# Images written by one `mgtq generate` (they are sampled in one batch: memory grows with the count).
MAX_IMAGES = 1024

# Calibration prompts of an SCQ recipe: the paper calibrates on hundreds of images; 100 000 synthesized
# 1024 px images are already about 100 GB of PNG in the run folder.
MAX_PROMPTS = 100_000
