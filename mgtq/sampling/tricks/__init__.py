"""The enhanced sampler's tricks (arXiv 2411.10781 §3), one module each, composed by
`mgtq.sampling.maskgit.sample`:

- noise.py        noise regularization   ℓ ← ℓ + I(t)·ε                     (§3.2)
- differential.py differential sampling  resample low-KL tokens from |p_i − p_{i−1}|  (§3.3)
- zsampling.py    masked Z-sampling      step, invert by re-masking, step again  (§3.4)
- momentum.py     momentum-based solver  1st/2nd order, Eq. 4/13
- reuse.py        context reuse's groups which tokens local steps compute (ReCAP §3.2; mgtq.reuse)

Each is a small pure function of tensors; the loop owns the (per-call) state they need.
"""
