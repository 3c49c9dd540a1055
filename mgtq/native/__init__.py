"""mgtq's hand-written CPU kernels and the CPU facts that choose them; they depend on torch only.

- :mod:`.cpu`: what the CPU offers (its kernel class: AMX-int8, AVX512-VNNI, AVX2 …), read once.
- :mod:`.amx`: C++ kernels for CPUs with AMX, built at first use with the compiler ``torch.compile``
  uses: int4-weight GEMMs (W4A8, W4A16) for :mod:`mgtq.quantization.kernels`, bf16 attention, the
  QK-norm + RoPE and the RMSNorm for :mod:`mgtq.fused`.

Both the float layers and the quantized ones build on this package; it imports neither.
"""
