"""mgtq's own kernels for CPUs with AMX-int8: int4 weights unpacked straight into AMX tiles (no weight cache),
and bf16 attention; and their versions for AVX-512 CPUs without AMX: W4A8 on AVX512-VNNI (AMD Zen 4, Intel
Cascade / Ice Lake), W4A16 and attention on AVX512-BF16 (AMD Zen 4, Intel Cooper Lake).

Why hand-written: nothing torch or torchao ship multiplies int8 activations by *int4* weights on
AMX without a second copy of the weight. ``torch._int_mm`` runs on AVX512-VNNI, needs the weight
unpacked to int8 first and leaves an int32 accumulator whose rescale epilogue costs as much as the
GEMM; oneDNN's AMX int8 linear (``onednn.qlinear_pointwise``) needs its own prepacked int8 copy of
every weight (+1 byte per weight: mgtq's opt-in weight cache), and prepacking per call costs as much
as the GEMM; Inductor's CPP GEMM template reaches AMX int8 only on a frozen int8 weight (the same
copy); torchao's ``da8w4`` CPU kernel is not in its PyPI wheel.

Kernels: :func:`w4a8_linear` (int8 x int4 on ``tdpbssd``), :func:`w4a8_vnni_linear` (the same on
``vpdpbusd``, bit for bit), :func:`w4a16_linear` (bf16 x int4
dequantized to bf16, on ``tdpbf16ps``), :func:`quantize_int8` (the activation quantizer, one
AVX-512 pass) and :func:`attention`; with them two one-pass AVX-512 norms, :func:`qknorm_rope`
(attention's QK-norm + RoPE) and :func:`rms_norm` (diffusers' RMSNorm of the token grids around the
transformer). Both GEMMs can apply the MLP's tanh-GELU to the fp32 result before the one rounding.

Attention is here because torch's CPU flash attention runs its two bf16 products far below the AMX
throughput oneDNN's linear layers reach on the same CPU (``benchmarks/bench_attention.py`` times both
attentions at Meissonic's shapes); with the score rows of 32 queries held whole in L2, the softmax needs no running
rescale, and the kernel writes the ``(B, S, H, D)`` layout the output projection reads.

What W4A8 computes, for int8 ``x_q (M, K)``, the split-halves packed int4 weight ``(N, K/2)`` of
:mod:`mgtq.quantization.packing`, fp32 column scales and bias: exactly
:func:`mgtq.quantization.qtensor.int8_int4_linear`, bit for bit
(the int32 sums of ``x_q * 16q`` are exact; then ``fma(acc, scale / 16, bias)`` in fp32, as torch's
``addcmul``, rounded once to bf16 or kept in fp32).

How: the output columns go in chunks of about 1 MiB of unpacked weight (``chunk_n``). A chunk's
int4 weights are unpacked once per call into AMX's B-tile layout (4 consecutive inputs of one
output column side by side), 16q as in ``unpack_int4_times16``, so no sign extension; then every
32-row block of ``x_q`` runs 2 x 2 tiles (``tdpbssd``, int8 x int8 -> int32) against it, 32 columns at a
time; each 32 x 32 int32 result is rescaled and stored (one 64-byte line per output row) while the tiles
already work on the next 32 columns. OpenMP threads split the chunks.

Without AMX (:func:`w4a8_vnni_linear`): the same chunks and unpacked rows, 6 rows x 64 columns of int32
sums in 24 zmm registers; ``vpdpbusd`` takes unsigned x, so x + 128 goes in and 128 x the column sums
of 16q come off (exact). Its only instructions beyond AVX512-BW are VNNI's; the bf16 rounding is written
out, as Ice Lake has no AVX512-BF16. :func:`w4a16_avx512_linear` runs the same register block on ``vdpbf16ps``
over the AMX W4A16 kernel's dequantized chunks (2 inputs of 16 columns per 64-byte row, ``vdpbf16ps``'s
operand), so the bf16 weight is never written out whole as dequantize + oneDNN's GEMM does.

Built at first use on x86-64 Linux CPUs with AVX512-VNNI, with the C++ compiler ``torch.compile`` uses on
CPU (Inductor's ``CppCodeCache``, cached by source hash in mgtq's compile cache folder, which a reboot
keeps). Where the build fails (no compiler, another CPU) :func:`vnni_available` and :func:`available` are
False; where the CPU has no AMX-int8 or the kernel may not use AMX tiles (``arch_prctl`` permission),
:func:`available` is False. Then :func:`mgtq.quantization.kernels.choose_kernel` and
:func:`mgtq.fused.attention` keep torch's kernels.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
import warnings

import torch

from .cpu import cpu_flags

__all__ = ["available", "vnni_available", "avx512_bf16_available", "supports", "supports_vnni", "supports_w4a16",
           "supports_w4a16_avx512", "vnni_chunk_n", "supports_attention", "chunk_n", "quantize_int8", "w4a8_linear",
           "w4a8_vnni_linear", "w4a16_linear", "w4a16_avx512_linear", "attention", "supports_qknorm_rope", "qknorm_rope",
           "supports_rms_norm", "rms_norm"]

log = logging.getLogger(__name__)

# Rows of x per block (2 A tiles of 16 rows), columns per B tile pair, inputs per tile.
BLOCK_M = 32
BLOCK_N = 32
TILE_K = 64
# Unpacked weight bytes per column chunk: about 1 MiB stays in L2 while all row blocks stream past it;
# every chunk streams the activations once more, so smaller chunks re-read them from L3 more often.
CHUNK_BYTES = 1 << 20
# The AVX512-VNNI W4A8 kernel: 64 columns per register block (4 zmm of 16 int32 sums), chunks of about
# CHUNK_BYTES of unpacked weight as the AMX kernels (fewer, larger chunks copy each row block of x less often).
VNNI_BLOCK_N = 64

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <omp.h>
#include <math.h>

// Only these functions need AMX / AVX-512; the rest of the build keeps the compiler's defaults.
// fp-contract off: the epilogue's one fma is written out; nothing else may be contracted.
#define TGT __attribute__((target("avx512f,avx512bw,avx512bf16,amx-tile,amx-int8,amx-bf16"), optimize("fp-contract=off")))
// What the AVX512-VNNI class has (Intel since Cascade Lake, AMD since Zen 4): the code every class here runs.
#define VTGT __attribute__((target("avx512f,avx512bw,avx512vnni"), optimize("fp-contract=off")))

extern "C" int mgtq_amx_init() {
  // Linux hands out AMX tile state only on request (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
  return syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : 0;
}

// 16 bf16 values -> fp32 (exact: a bf16 is the top half of an fp32).
VTGT static inline __m512 load_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

struct alignas(64) TileCfg {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

TGT static void config_tiles() {
  TileCfg cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }  // every tile 16 x 64 bytes
  _tile_loadconfig(&cfg);
}

// One K step of a 2 x 2 block of 16 x 16 accumulators (tiles 0-3): A tiles of rows 0-15 (a0) and 16-31 (a1), with
// their row stride in bytes, times B tiles of columns 0-15 (b0) and 16-31 (b1), 64-byte rows. INT8: tdpbssd, else
// tdpbf16ps. Every GEMM here runs this step.
template <bool INT8>
TGT static inline __attribute__((always_inline)) void tile_step(const void* a0, const void* a1, int64_t a_stride,
                                                                const void* b0, const void* b1) {
  _tile_loadd(4, a0, a_stride);
  _tile_loadd(5, a1, a_stride);
  _tile_loadd(6, b0, 64);
  _tile_loadd(7, b1, 64);
  if constexpr (INT8) {
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    _tile_dpbssd(2, 5, 6);
    _tile_dpbssd(3, 5, 7);
  } else {
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

// tanh-GELU of the fp32 result before its one rounding, as F.gelu(approximate="tanh") and oneDNN's post-op:
// y * sigmoid(2u), u = sqrt(2/pi) (y + 0.044715 y^3); exp by 2^n * p(r), |r| <= ln2 / 2, p of degree 6
// (a few fp32 ulps; the bf16 output rounds them away but for rare ties).
VTGT static inline __m512 gelu_tanh(__m512 y) {
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                 _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), y), _mm512_mul_ps(y, y), y));
  __m512 z = _mm512_mul_ps(_mm512_set1_ps(-2.0f), u);
  z = _mm512_min_ps(_mm512_max_ps(z, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(z, _mm512_set1_ps(1.4426950408889634f)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), z);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  const __m512 e = _mm512_scalef_ps(p, n);  // exp(-2u)
  return _mm512_div_ps(y, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// 16 x 16 dwords in registers: r[i] holds row i on entry and column i on return (dword j of the result = dword i
// of row j). Three rounds of in-lane unpacks and 128-bit lane shuffles, no memory round trip.
VTGT static inline void transpose16(__m512i r[16]) {
  __m512i a[16], b[16];
  for (int i = 0; i < 8; ++i) {
    a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int g = 0; g < 4; ++g) {  // b[4g + k], lane L: rows 4g .. 4g+3 of column 4L + k
    b[4 * g] = _mm512_unpacklo_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 1] = _mm512_unpackhi_epi64(a[4 * g], a[4 * g + 2]);
    b[4 * g + 2] = _mm512_unpacklo_epi64(a[4 * g + 1], a[4 * g + 3]);
    b[4 * g + 3] = _mm512_unpackhi_epi64(a[4 * g + 1], a[4 * g + 3]);
  }
  for (int k = 0; k < 4; ++k) {  // column 4L + k: lane L of b[k], b[4 + k], b[8 + k], b[12 + k]
    const __m512i d0 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0x44), d1 = _mm512_shuffle_i32x4(b[k], b[4 + k], 0xEE);
    const __m512i d2 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0x44);
    const __m512i d3 = _mm512_shuffle_i32x4(b[8 + k], b[12 + k], 0xEE);
    r[k] = _mm512_shuffle_i32x4(d0, d2, 0x88);
    r[4 + k] = _mm512_shuffle_i32x4(d0, d2, 0xDD);
    r[8 + k] = _mm512_shuffle_i32x4(d1, d3, 0x88);
    r[12 + k] = _mm512_shuffle_i32x4(d1, d3, 0xDD);
  }
}

// One 64-input block of 16 columns as 16 rows of 16q (row r: inputs 4r .. 4r+3 of each column): the low nibbles
// (high = 0) of packed bytes j0 .. j0+63 give inputs j0 .. j0+63, the high nibbles inputs j0+K/2 .. (high = 1).
VTGT static inline void unpack_block(const uint8_t* packed, int64_t half, int64_t n, int64_t j0, int high,
                                     __m512i rows[16]) {
  const __m512i top = _mm512_set1_epi8((char)0xF0);
  for (int c = 0; c < 16; ++c) {
    const __m512i p = _mm512_loadu_si512(packed + (n + c) * half + j0);
    rows[c] = _mm512_and_si512(high ? p : _mm512_slli_epi16(p, 4), top);  // 16 * the nibble
  }
  transpose16(rows);
}

// Columns [n0, n0 + nb) of the split-halves int4 weight -> B tiles of 16q, [nb/16][K/64][16 rows][64 bytes]:
// tile row r holds, for each of the 16 columns, its inputs 4r .. 4r+3 of that 64-input block.
VTGT static void unpack_b(const uint8_t* packed, int64_t K, int64_t n0, int64_t nb, int8_t* buf) {
  const int64_t half = K / 2, kblocks = K / 64;
  for (int64_t t = 0; t < nb / 16; ++t) {
    for (int64_t j0 = 0; j0 < half; j0 += 64) {
      for (int high = 0; high < 2; ++high) {
        __m512i rows[16];
        unpack_block(packed, half, n0 + t * 16, j0, high, rows);
        int8_t* tile = buf + (t * kblocks + (j0 + high * half) / 64) * 1024;
        for (int r = 0; r < 16; ++r) _mm512_store_si512(tile + r * 64, rows[r]);
      }
    }
  }
}

// x (numel, bf16 or fp32) -> int8: round-half-even of x * inv_scale in fp32, clamped to [-128, 127] (the
// clamp first: its bounds are integers, so the result is the same as torch's round-then-clamp).
extern "C" VTGT void mgtq_quantize_int8(const void* x, int64_t x_bf16, float inv_scale, int8_t* out, int64_t numel,
                                      int64_t nthreads) {
  const int64_t blocks = numel / 16;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    __m512 f;
    if (x_bf16) {
      f = load_bf16((const uint16_t*)x + b * 16);
    } else {
      f = _mm512_loadu_ps((const float*)x + b * 16);
    }
    f = _mm512_mul_ps(f, _mm512_set1_ps(inv_scale));
    f = _mm512_min_ps(_mm512_max_ps(f, _mm512_set1_ps(-128.0f)), _mm512_set1_ps(127.0f));
    _mm_storeu_si128((__m128i*)(out + b * 16), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(f)));  // MXCSR: nearest-even
  }
  for (int64_t i = blocks * 16; i < numel; ++i) {
    float v;
    if (x_bf16) {
      const uint32_t u = (uint32_t)((const uint16_t*)x)[i] << 16;
      memcpy(&v, &u, 4);
    } else {
      v = ((const float*)x)[i];
    }
    v *= inv_scale;
    v = v < -128.0f ? -128.0f : (v > 127.0f ? 127.0f : v);
    out[i] = (int8_t)_mm_cvtss_si32(_mm_set_ss(v));
  }
}
// W4A16: columns [n0, n0 + nb) dequantized to bf16 B tiles, [nb/16][K/32][16 rows][32 bf16]: tile row r holds, for
// each of the 16 columns, its inputs 2r, 2r+1 of that 32-input block. Each weight is (16q) * (scale / 16) in fp32,
// rounded once to bf16: the bits mgtq's torch dequantizer gives. From unpack_block's rows (4 inputs of each column
// per dword): the low words of the dwords are one pair row, the high words the next.
TGT static void unpack_b_bf16(const uint8_t* packed, const float* scale16, int64_t groups, int64_t K, int64_t n0,
                              int64_t nb, uint16_t* buf) {
  const int64_t half = K / 2, gsize = K / groups;
  const __m512i dup_lo = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i dup_hi = _mm512_add_epi32(dup_lo, _mm512_set1_epi32(8));
  const __m512i col = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                         _mm512_set1_epi32((int)groups));
  for (int64_t t = 0; t < nb / 16; ++t) {
    const float* s0 = scale16 + (n0 + t * 16) * groups;
    uint16_t* tile = buf + t * 16 * K;  // pair q of this column tile: tile + 32 q
    for (int64_t j0 = 0; j0 < half; j0 += 64) {
      for (int high = 0; high < 2; ++high) {
        __m512i rows[16];
        unpack_block(packed, half, n0 + t * 16, j0, high, rows);
        const int64_t kbase = j0 + high * half;
        int64_t group = -1;
        __m512 s_lo = _mm512_setzero_ps(), s_hi = s_lo;
        for (int r = 0; r < 16; ++r) {
          const int64_t k = kbase + 4 * r;
          if (k / gsize != group) {  // each column's scale, twice (a pair of inputs per column)
            group = k / gsize;
            const __m512 s = _mm512_i32gather_ps(col, s0 + group, 4);
            s_lo = _mm512_permutexvar_ps(dup_lo, s);
            s_hi = _mm512_permutexvar_ps(dup_hi, s);
          }
          for (int w = 0; w < 2; ++w) {  // inputs 4r, 4r+1 (low words), then 4r+2, 4r+3
            const __m256i pairs = _mm512_cvtepi32_epi16(w ? _mm512_srli_epi32(rows[r], 16) : rows[r]);
            const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(pairs))), s_lo);
            const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(pairs, 1))),
                                            s_hi);
            _mm512_store_si512(tile + (k / 2 + w) * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
          }
        }
      }
    }
  }
}

// The driver both GEMMs share. Output columns in chunks (and a chunk's 32-row blocks split among threads
// when there are more threads than chunks: each unpacks the chunk for itself, so none idles); every 32-row
// block of x runs 2 x 2 tiles against the chunk, one 32-column pair after another.
// INT8: x int8, B tiles of 16q, tdpbssd, int32 sums times scale / 16 (+ bias, fma as torch's addcmul);
// else: x bf16, B tiles of bf16 weights, tdpbf16ps, fp32 sums + bias.
// The epilogue of a column pair runs while the tile unit works on the next pair: its 32 rows are spread over
// the next pair's first K steps (the AVX-512 work hides behind the tile ops; run after the tiles, it added
// 10-25 % at K = 1024). Each output row's 32 columns go out as one 64-byte line (bf16).
template <bool INT8>
TGT static void amx_gemm(const void* x, const uint8_t* packed, const float* scale16, int64_t groups, const float* bias,
                         void* out, int64_t M, int64_t K, int64_t N, int64_t out_bf16, int64_t gelu, int64_t chunk_n,
                         int64_t nthreads) {
  const int64_t es = INT8 ? 1 : 2;  // bytes per element of x and of the unpacked weight
  const int64_t kblocks = K * es / 64;  // 64-byte tile rows along K
  const int64_t nchunks = (N + chunk_n - 1) / chunk_n;
  const int64_t mblocks = (M + 31) / 32;
  const int64_t rows_per_step = (32 + kblocks - 1) / kblocks;  // epilogue rows per K step of the next pair
  int64_t mparts = (nthreads + nchunks - 1) / nchunks;
  if (mparts > mblocks) mparts = mblocks > 0 ? mblocks : 1;
#pragma omp parallel num_threads(nthreads)
  {
    config_tiles();
    uint8_t* bbuf = (uint8_t*)aligned_alloc(64, chunk_n * K * es);
    uint8_t* apad = (uint8_t*)aligned_alloc(64, 32 * K * es);
    alignas(64) int32_t cbuf[2][4][256];  // two pairs' int32 sums (INT8) or fp32 sums' bits: stored, pending
#pragma omp for schedule(static)
    for (int64_t item = 0; item < nchunks * mparts; ++item) {
      const int64_t c = item / mparts, part = item % mparts;
      const int64_t m_begin = mblocks * part / mparts * 32, m_end = mblocks * (part + 1) / mparts * 32;
      const int64_t n0 = c * chunk_n;
      const int64_t nb = (N - n0) < chunk_n ? (N - n0) : chunk_n;
      if constexpr (INT8) {
        unpack_b(packed, K, n0, nb, (int8_t*)bbuf);
      } else {
        unpack_b_bf16(packed, scale16, groups, K, n0, nb, (uint16_t*)bbuf);
      }
      for (int64_t m0 = m_begin; m0 < m_end && m0 < M; m0 += 32) {
        const uint8_t* a = (const uint8_t*)x + m0 * K * es;
        const int64_t mrows = (M - m0) < 32 ? (M - m0) : 32;
        if (mrows < 32) {  // last rows: a zero-padded copy, so every tile is full
          memcpy(apad, a, mrows * K * es);
          memset(apad + mrows * K * es, 0, (32 - mrows) * K * es);
          a = apad;
        }
        // Rows [r0, r1) of the 32 x 32 result of column pair s (sums in cb): scale, bias, GELU, store.
        auto epilogue = [&](const int32_t (*cb)[256], int64_t s, int64_t r0, int64_t r1) {
          const int64_t n = n0 + 32 * s;
          if (r1 > mrows) r1 = mrows;
          for (int64_t row = r0; row < r1; ++row) {
            const int64_t i = row >> 4, r = row & 15;
            __m512 y[2];
            for (int j = 0; j < 2; ++j) {
              const __m512 bi = bias ? _mm512_loadu_ps(bias + n + 16 * j) : _mm512_setzero_ps();
              if constexpr (INT8) {
                const __m512 acc = _mm512_cvtepi32_ps(_mm512_load_si512(cb[2 * i + j] + r * 16));
                const __m512 sc = _mm512_loadu_ps(scale16 + n + 16 * j);
                y[j] = bias ? _mm512_fmadd_ps(acc, sc, bi) : _mm512_mul_ps(acc, sc);
              } else {
                y[j] = _mm512_add_ps(_mm512_load_ps((const float*)cb[2 * i + j] + r * 16), bi);
              }
              if (gelu) y[j] = gelu_tanh(y[j]);
            }
            const int64_t m = m0 + row;
            if (out_bf16) {
              const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(y[0])),
                                                      (__m256i)_mm512_cvtneps_pbh(y[1]), 1);
              _mm512_storeu_si512((uint16_t*)out + m * N + n, line);
            } else {
              _mm512_storeu_ps((float*)out + m * N + n, y[0]);
              _mm512_storeu_ps((float*)out + m * N + n + 16, y[1]);
            }
          }
        };
        const int64_t pairs = nb / 32;
        for (int64_t s = 0; s < pairs; ++s) {
          const int32_t (*pending)[256] = cbuf[(s + 1) & 1];  // pair s - 1, stored last time round
          _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
          const uint8_t* b0 = bbuf + (2 * s) * kblocks * 1024;
          const uint8_t* b1 = bbuf + (2 * s + 1) * kblocks * 1024;
          for (int64_t kb = 0; kb < kblocks; ++kb) {
            tile_step<INT8>(a + kb * 64, a + 16 * K * es + kb * 64, K * es, b0 + kb * 1024, b1 + kb * 1024);
            if (s > 0 && kb * rows_per_step < 32) {
              epilogue(pending, s - 1, kb * rows_per_step, (kb + 1) * rows_per_step);
            }
          }
          int32_t (*sums)[256] = cbuf[s & 1];
          _tile_stored(0, sums[0], 64);
          _tile_stored(1, sums[1], 64);
          _tile_stored(2, sums[2], 64);
          _tile_stored(3, sums[3], 64);
        }
        if (pairs > 0) epilogue(cbuf[(pairs - 1) & 1], pairs - 1, 0, 32);
      }
    }
    free(bbuf);
    free(apad);
    _tile_release();
  }
}

extern "C" TGT void mgtq_w4a8_amx(const int8_t* x, const uint8_t* packed, const float* scale16, const float* bias,
                                 void* out, int64_t M, int64_t K, int64_t N, int64_t out_bf16, int64_t gelu,
                                 int64_t chunk_n, int64_t nthreads) {
  amx_gemm<true>(x, packed, scale16, 1, bias, out, M, K, N, out_bf16, gelu, chunk_n, nthreads);
}

extern "C" TGT void mgtq_w4a16_amx(const uint16_t* x, const uint8_t* packed, const float* scale16, int64_t groups,
                                  const float* bias, uint16_t* out, int64_t M, int64_t K, int64_t N, int64_t gelu,
                                  int64_t chunk_n, int64_t nthreads) {
  amx_gemm<false>(x, packed, scale16, groups, bias, out, M, K, N, 1, gelu, chunk_n, nthreads);
}
// fp32 -> bf16, round to nearest even, NaN -> 0xFFFF: torch's vectorised CPU cast, without AVX512-BF16 (Ice Lake
// has none).
VTGT static inline __m256i cvt_bf16(__m512 y) {
  const __m512i u = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32((int)0xFFFF0000u));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
}

// W4A8 on AVX512-VNNI (no AMX): the AMX kernel's numerics (exact int32 sums of x_q * 16q, then
// fma(acc, scale / 16, bias) in fp32, optional tanh-GELU, one rounding) on vpdpbusd. A chunk's weights are
// unpacked once per call by unpack_b, whose 64-byte rows (4 inputs of 16 columns) are vpdpbusd's operand
// layout. vpdpbusd multiplies unsigned by signed bytes: each row block of x is copied as x + 128 (xor
// 0x80), and 128 * (column sum of 16q) comes off the int32 sums (exact: |sums| < 2^31 for K <= 2^14).
// Register block: 6 rows x 64 columns = 24 zmm sums, 4 weight rows and one broadcast per input quad.
constexpr int VNNI_MR = 6;

extern "C" VTGT void mgtq_w4a8_vnni(const int8_t* x, const uint8_t* packed, const float* scale16, const float* bias,
                                   void* out, int64_t M, int64_t K, int64_t N, int64_t out_bf16, int64_t gelu,
                                   int64_t chunk_n, int64_t nthreads) {
  const int64_t nchunks = (N + chunk_n - 1) / chunk_n;
  const int64_t mblocks = (M + VNNI_MR - 1) / VNNI_MR;
  const int64_t quads = K / 4;
  int64_t mparts = (nthreads + nchunks - 1) / nchunks;
  if (mparts > mblocks) mparts = mblocks > 0 ? mblocks : 1;
#pragma omp parallel num_threads(nthreads)
  {
    int8_t* bbuf = (int8_t*)aligned_alloc(64, chunk_n * K);
    int32_t* csum = (int32_t*)aligned_alloc(64, chunk_n * 4);  // 128 * column sums of 16q
    uint8_t* abuf = (uint8_t*)aligned_alloc(64, VNNI_MR * K);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < nchunks * mparts; ++item) {
      const int64_t c = item / mparts, part = item % mparts;
      const int64_t m_begin = mblocks * part / mparts * VNNI_MR, m_end = mblocks * (part + 1) / mparts * VNNI_MR;
      const int64_t n0 = c * chunk_n;
      const int64_t nb = (N - n0) < chunk_n ? (N - n0) : chunk_n;
      unpack_b(packed, K, n0, nb, bbuf);
      const __m512i ones = _mm512_set1_epi8(1);
      for (int64_t t = 0; t < nb / 16; ++t) {
        __m512i s = _mm512_setzero_si512();
        for (int64_t q = 0; q < quads; ++q) s = _mm512_dpbusd_epi32(s, ones, _mm512_load_si512(bbuf + (t * quads + q) * 64));
        _mm512_store_si512(csum + t * 16, _mm512_slli_epi32(s, 7));
      }
      for (int64_t m0 = m_begin; m0 < m_end && m0 < M; m0 += VNNI_MR) {
        const int64_t rows = (M - m0) < VNNI_MR ? (M - m0) : VNNI_MR;
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        for (int64_t r = 0; r < VNNI_MR; ++r) {  // rows past M: x = 0 (their sums are never stored)
          for (int64_t k = 0; k < K; k += 64) {
            const __m512i v = r < rows ? _mm512_loadu_si512(x + (m0 + r) * K + k) : _mm512_setzero_si512();
            _mm512_store_si512(abuf + r * K + k, _mm512_xor_si512(v, flip));
          }
        }
        for (int64_t p = 0; p < nb / 64; ++p) {
          const int8_t* b = bbuf + p * 4 * quads * 64;
          __m512i acc[VNNI_MR][4];
#pragma GCC unroll 6
          for (int r = 0; r < VNNI_MR; ++r) {
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_si512();
          }
          for (int64_t q = 0; q < quads; ++q) {
            __m512i w[4];
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) w[j] = _mm512_load_si512(b + (j * quads + q) * 64);
#pragma GCC unroll 6
            for (int r = 0; r < VNNI_MR; ++r) {
              const __m512i a = _mm512_set1_epi32(*(const int32_t*)(abuf + r * K + 4 * q));
#pragma GCC unroll 4
              for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], a, w[j]);
            }
          }
          alignas(64) int32_t sbuf[VNNI_MR][4][16];  // constant indices above keep the sums in registers
#pragma GCC unroll 6
          for (int r = 0; r < VNNI_MR; ++r) {
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) _mm512_store_si512(sbuf[r][j], acc[r][j]);
          }
          const int64_t n = n0 + 64 * p;
          for (int r = 0; r < rows; ++r) {
            const int64_t m = m0 + r;
            for (int j = 0; j < 4; ++j) {
              const __m512i sums = _mm512_sub_epi32(_mm512_load_si512(sbuf[r][j]),
                                                    _mm512_load_si512(csum + 64 * p + 16 * j));
              const __m512 f = _mm512_cvtepi32_ps(sums);
              const __m512 sc = _mm512_loadu_ps(scale16 + n + 16 * j);
              __m512 y = bias ? _mm512_fmadd_ps(f, sc, _mm512_loadu_ps(bias + n + 16 * j)) : _mm512_mul_ps(f, sc);
              if (gelu) y = gelu_tanh(y);
              if (out_bf16) {
                _mm256_storeu_si256((__m256i*)((uint16_t*)out + m * N + n + 16 * j), cvt_bf16(y));
              } else {
                _mm512_storeu_ps((float*)out + m * N + n + 16 * j, y);
              }
            }
          }
        }
      }
    }
    free(bbuf);
    free(csum);
    free(abuf);
  }
}

// W4A16 on AVX512-BF16 (no AMX: AMD Zen 4, Intel Cooper Lake): the AMX W4A16 kernel's numerics (the bf16 weights
// of mgtq's dequantizer, fp32 sums of bf16 products, + bias, optional tanh-GELU, one rounding) on vdpbf16ps. A
// chunk's weights are dequantized once per call by unpack_b_bf16, whose 64-byte tile rows (2 inputs of 16 columns)
// are vdpbf16ps's operand layout: the dequantized weight never leaves the cache, where dequantize + oneDNN's GEMM
// writes and reads it whole. The register block of the VNNI kernel (6 rows x 64 columns of fp32 sums), one
// broadcast input pair per row.
extern "C" TGT void mgtq_w4a16_avx512(const uint16_t* x, const uint8_t* packed, const float* scale16, int64_t groups,
                                     const float* bias, uint16_t* out, int64_t M, int64_t K, int64_t N, int64_t gelu,
                                     int64_t chunk_n, int64_t nthreads) {
  const int64_t nchunks = (N + chunk_n - 1) / chunk_n;
  const int64_t mblocks = (M + VNNI_MR - 1) / VNNI_MR;
  const int64_t pairs = K / 2;
  int64_t mparts = (nthreads + nchunks - 1) / nchunks;
  if (mparts > mblocks) mparts = mblocks > 0 ? mblocks : 1;
#pragma omp parallel num_threads(nthreads)
  {
    uint16_t* bbuf = (uint16_t*)aligned_alloc(64, chunk_n * K * 2);
    int32_t* zero = (int32_t*)calloc(pairs, 4);  // the input row of rows past M (their sums are never stored)
#pragma omp for schedule(static)
    for (int64_t item = 0; item < nchunks * mparts; ++item) {
      const int64_t c = item / mparts, part = item % mparts;
      const int64_t m_begin = mblocks * part / mparts * VNNI_MR, m_end = mblocks * (part + 1) / mparts * VNNI_MR;
      const int64_t n0 = c * chunk_n;
      const int64_t nb = (N - n0) < chunk_n ? (N - n0) : chunk_n;
      unpack_b_bf16(packed, scale16, groups, K, n0, nb, bbuf);
      for (int64_t m0 = m_begin; m0 < m_end && m0 < M; m0 += VNNI_MR) {
        const int64_t rows = (M - m0) < VNNI_MR ? (M - m0) : VNNI_MR;
        const int32_t* a[VNNI_MR];  // each row's inputs as bf16 pairs
        for (int r = 0; r < VNNI_MR; ++r) a[r] = r < rows ? (const int32_t*)(x + (m0 + r) * K) : zero;
        for (int64_t p = 0; p < nb / 64; ++p) {
          const uint16_t* b = bbuf + p * 4 * pairs * 32;
          __m512 acc[VNNI_MR][4];
#pragma GCC unroll 6
          for (int r = 0; r < VNNI_MR; ++r) {
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
          }
          for (int64_t q = 0; q < pairs; ++q) {
            __m512bh w[4];
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) w[j] = (__m512bh)_mm512_load_si512(b + (j * pairs + q) * 32);
#pragma GCC unroll 6
            for (int r = 0; r < VNNI_MR; ++r) {
              const __m512bh ar = (__m512bh)_mm512_set1_epi32(a[r][q]);
#pragma GCC unroll 4
              for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], ar, w[j]);
            }
          }
          alignas(64) float sbuf[VNNI_MR][4][16];  // constant indices above keep the sums in registers
#pragma GCC unroll 6
          for (int r = 0; r < VNNI_MR; ++r) {
#pragma GCC unroll 4
            for (int j = 0; j < 4; ++j) _mm512_store_ps(sbuf[r][j], acc[r][j]);
          }
          const int64_t n = n0 + 64 * p;
          for (int r = 0; r < rows; ++r) {
            for (int j = 0; j < 4; ++j) {
              __m512 y = _mm512_add_ps(_mm512_load_ps(sbuf[r][j]),
                                       bias ? _mm512_loadu_ps(bias + n + 16 * j) : _mm512_setzero_ps());
              if (gelu) y = gelu_tanh(y);
              _mm256_storeu_si256((__m256i*)(out + (m0 + r) * N + n + 16 * j), (__m256i)_mm512_cvtneps_pbh(y));
            }
          }
        }
      }
    }
    free(bbuf);
    free(zero);
  }
}

// 2^z for z <= 0 (clamped at -126): 2^n * p(r), r = z - round(z) in [-1/2, 1/2], p the degree-5 Taylor polynomial
// of 2^r (relative error < 3e-6, far below the bf16 rounding of the probabilities it makes; cheaper than gelu_tanh's
// exp, which keeps a few ulps because its result is not rounded to bf16 before it is used).
TGT static inline __m512 exp2_ps(__m512 z) {
  z = _mm512_max_ps(z, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT);
  const __m512 r = _mm512_sub_ps(z, n);
  __m512 p = _mm512_set1_ps(1.3333558146428443e-3f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.2402265069591007f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// One (batch, head)'s keys as B tiles of k^T: tile (key tile t, D block db), row r, dword n = the pair
// d = 32 db + 2r, +1 of key 16 t + n (zero past Sk). kst: the key stride, in elements.
TGT static void pack_keys(const uint16_t* k, int64_t kst, int64_t Sk, int64_t skp, int64_t D, uint16_t* kp) {
  const int64_t dblocks = D / 32;
  const __m512i keys = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32((int)(kst / 2)));
  for (int64_t t = 0; t < skp / 16; ++t) {
    const int64_t valid = Sk - 16 * t;
    const __mmask16 live = valid >= 16 ? (__mmask16)0xFFFF : (valid <= 0 ? 0 : (__mmask16)((1u << valid) - 1));
    for (int64_t db = 0; db < dblocks; ++db) {
      uint16_t* tile = kp + (t * dblocks + db) * 512;
      const int32_t* base = live ? (const int32_t*)(k + 16 * t * kst + db * 32) : (const int32_t*)k;
      for (int r = 0; r < 16; ++r) {
        _mm512_store_si512(tile + r * 32, _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), live, keys, base + r, 4));
      }
    }
  }
}

// One (batch, head)'s values as B tiles: tile (D tile u, key block j), row r, dword n = v[32 j + 2r][16 u + n]
// (low half) and v[32 j + 2r + 1][16 u + n] (high half); zero past Sk.
TGT static void pack_values(const uint16_t* v, int64_t vst, int64_t Sk, int64_t skp, int64_t D, uint16_t* vp) {
  const int64_t kblocks = skp / 32;
  for (int64_t j = 0; j < kblocks; ++j) {
    for (int r = 0; r < 16; ++r) {
      const int64_t k0 = 32 * j + 2 * r, k1 = k0 + 1;
      for (int64_t u = 0; u < D / 16; ++u) {
        const __m512i lo = k0 < Sk ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v + k0 * vst + 16 * u)))
                                   : _mm512_setzero_si512();
        const __m512i hi = k1 < Sk ? _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(v + k1 * vst + 16 * u)))
                                   : _mm512_setzero_si512();
        _mm512_store_si512(vp + (u * kblocks + j) * 512 + r * 32, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
    }
  }
}

// softmax(q k^T * scale + key_bias) v for bf16 q (B, H, Sq, D) and k, v (B, H, Sk, D), given by element strides
// {batch, head, row} (last dim contiguous), D a multiple of 32; out bf16 (B, Sq, H, D), contiguous.
// key_bias: null or (B, skp) fp32, log2(e) * bias, -inf past Sk (skp = Sk rounded up to 32).
// Work items are (batch, head, 32 queries); a thread packs k and v of each (batch, head) it meets (L2-sized).
// Per item: the whole score rows s = q k^T (fp32, 32 x skp, in L2) on tiles; an exact softmax per row in
// base 2 (max, 2^(t - max), sum; probabilities rounded to bf16 for the second GEMM, as torch's CPU flash
// attention does); o = p v on tiles, keys in chunks of 256 whose probabilities stay in L1, the fp32 sums
// kept between chunks; o / sum stored.
// AMX: both products on tiles. Otherwise (CPUs with AVX512-BF16 but no AMX, e.g. AMD Zen 4) the same packed
// k and v rows are vdpbf16ps's operands: 8 query rows x 32 keys (scores) or x 32 outputs (p v) of fp32 sums in
// 16 zmm registers, a broadcast pair of q or p per step; the softmax and the stores are shared.
template <bool AMX>
TGT static void attention_impl(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* key_bias,
                               uint16_t* out, int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t D,
                               const int64_t* qst, const int64_t* kst, const int64_t* vst, float scale,
                               int64_t nthreads) {
  const int64_t skp = (Sk + 31) / 32 * 32, kblocks = skp / 32, dblocks = D / 32, qblocks = (Sq + 31) / 32;
  const int64_t full = Sk / 16 * 16;  // keys in whole vectors of 16; the rest in one masked vector
  const __mmask16 tail = (__mmask16)((1u << (Sk - full)) - 1);
  const float sl = scale * 1.4426950408889634f;  // scores in base 2
#pragma omp parallel num_threads(nthreads)
  {
    if constexpr (AMX) config_tiles();
    uint16_t* kp = (uint16_t*)aligned_alloc(64, skp * D * 2);
    uint16_t* vp = (uint16_t*)aligned_alloc(64, skp * D * 2);
    float* sbuf = (float*)aligned_alloc(64, 32 * skp * 4);
    uint16_t* pbuf = (uint16_t*)aligned_alloc(64, 32 * skp * 2);
    uint16_t* qpad = (uint16_t*)aligned_alloc(64, 32 * D * 2);
    float* obuf = (float*)aligned_alloc(64, 32 * D * 4);
    float rinv[32];
    int64_t packed_bh = -1;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < B * H * qblocks; ++item) {
      const int64_t bh = item / qblocks, q0 = (item % qblocks) * 32;
      const int64_t b = bh / H, h = bh % H;
      if (bh != packed_bh) {
        pack_keys(k + b * kst[0] + h * kst[1], kst[2], Sk, skp, D, kp);
        pack_values(v + b * vst[0] + h * vst[1], vst[2], Sk, skp, D, vp);
        packed_bh = bh;
      }
      const int64_t rows = Sq - q0 < 32 ? Sq - q0 : 32;
      const uint16_t* qa = q + b * qst[0] + h * qst[1] + q0 * qst[2];
      int64_t qstride = qst[2] * 2;  // bytes
      if (rows < 32) {  // last queries: a zero-padded copy, so every tile is full
        for (int64_t r = 0; r < 32; ++r) {
          if (r < rows) memcpy(qpad + r * D, qa + r * qst[2], D * 2);
          else memset(qpad + r * D, 0, D * 2);
        }
        qa = qpad;
        qstride = D * 2;
      }
      // s = q k^T, 32 keys at a time.
      if constexpr (!AMX) {
        // key tile t, pair dp of d: kp + t * 16 D + 32 dp (pack_keys' tiles of one key tile are consecutive)
        for (int64_t r0 = 0; r0 < 32; r0 += 8) {
          for (int64_t j = 0; j < kblocks; ++j) {
            __m512 acc[8][2];
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) { acc[r][0] = _mm512_setzero_ps(); acc[r][1] = _mm512_setzero_ps(); }
            const uint16_t* k0 = kp + (2 * j) * 16 * D;
            const uint16_t* k1 = k0 + 16 * D;
            for (int64_t dp = 0; dp < D / 2; ++dp) {
              const __m512bh b0 = (__m512bh)_mm512_load_si512(k0 + 32 * dp);
              const __m512bh b1 = (__m512bh)_mm512_load_si512(k1 + 32 * dp);
#pragma GCC unroll 8
              for (int r = 0; r < 8; ++r) {
                const __m512bh a = (__m512bh)_mm512_set1_epi32(
                    *(const int32_t*)((const uint8_t*)qa + (r0 + r) * qstride + 4 * dp));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
              }
            }
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) {
              _mm512_store_ps(sbuf + (r0 + r) * skp + 32 * j, acc[r][0]);
              _mm512_store_ps(sbuf + (r0 + r) * skp + 32 * j + 16, acc[r][1]);
            }
          }
        }
      }
      for (int64_t j = 0; AMX && j < kblocks; ++j) {
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t db = 0; db < dblocks; ++db) {
          tile_step<false>(qa + db * 32, (const uint8_t*)qa + 16 * qstride + db * 64, qstride,
                           kp + ((2 * j) * dblocks + db) * 512, kp + ((2 * j + 1) * dblocks + db) * 512);
        }
        _tile_stored(0, sbuf + 32 * j, skp * 4);
        _tile_stored(1, sbuf + 32 * j + 16, skp * 4);
        _tile_stored(2, sbuf + 16 * skp + 32 * j, skp * 4);
        _tile_stored(3, sbuf + 16 * skp + 32 * j + 16, skp * 4);
      }
      // Softmax per row, in base 2: t = s * scale * log2(e) (+ bias); p = 2^(t - max t) -> bf16; 1 / sum p.
      const float* bias = key_bias ? key_bias + b * skp : nullptr;
      for (int64_t r = 0; r < rows; ++r) {
        float* srow = sbuf + r * skp;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        if (bias) {  // t stored in place
          for (int64_t c = 0; c < skp; c += 16) {
            const __m512 t = _mm512_fmadd_ps(_mm512_load_ps(srow + c), _mm512_set1_ps(sl), _mm512_load_ps(bias + c));
            _mm512_store_ps(srow + c, t);
            mx = _mm512_max_ps(mx, t);
          }
        } else {  // max s; t - max t is one fma of s below
          for (int64_t c = 0; c < full; c += 16) mx = _mm512_max_ps(mx, _mm512_load_ps(srow + c));
          if (tail) mx = _mm512_mask_max_ps(mx, tail, mx, _mm512_load_ps(srow + full));
        }
        const float m = _mm512_reduce_max_ps(mx);
        uint16_t* prow = pbuf + r * skp;
        if (m == -INFINITY) {  // every key masked: no weight anywhere, a zero row (as SDPA)
          memset(prow, 0, skp * 2);
          rinv[r] = 0.0f;
          continue;
        }
        const __m512 mul = _mm512_set1_ps(bias ? 1.0f : sl), sub = _mm512_set1_ps(bias ? m : m * sl);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t c = 0; c < skp; c += 16) {
          __m512 p = exp2_ps(_mm512_fmsub_ps(_mm512_load_ps(srow + c), mul, sub));
          if (c >= full) p = _mm512_maskz_mov_ps(c == full ? tail : 0, p);  // past Sk: probability 0
          sum = _mm512_add_ps(sum, p);
          _mm256_store_si256((__m256i*)(prow + c), (__m256i)_mm512_cvtneps_pbh(p));
        }
        rinv[r] = 1.0f / _mm512_reduce_add_ps(sum);
      }
      for (int64_t r = rows; r < 32; ++r) memset(pbuf + r * skp, 0, skp * 2);
      // o = p v: per chunk of 256 keys, every 32 outputs of D on 2 x 2 tiles, sums carried in obuf (32 x D fp32).
      if constexpr (!AMX) {
        // D tile u, key pair kp: vp + u * 16 skp + 32 kp (pack_values' tiles of one D tile are consecutive)
        for (int64_t r0 = 0; r0 < rows; r0 += 8) {
          for (int64_t u = 0; u < D / 16; u += 2) {
            __m512 acc[8][2];
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) { acc[r][0] = _mm512_setzero_ps(); acc[r][1] = _mm512_setzero_ps(); }
            const uint16_t* v0 = vp + u * 16 * skp;
            const uint16_t* v1 = v0 + 16 * skp;
            for (int64_t kq = 0; kq < skp / 2; ++kq) {
              const __m512bh b0 = (__m512bh)_mm512_load_si512(v0 + 32 * kq);
              const __m512bh b1 = (__m512bh)_mm512_load_si512(v1 + 32 * kq);
#pragma GCC unroll 8
              for (int r = 0; r < 8; ++r) {
                const __m512bh a = (__m512bh)_mm512_set1_epi32(*(const int32_t*)(pbuf + (r0 + r) * skp + 2 * kq));
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
              }
            }
#pragma GCC unroll 8
            for (int r = 0; r < 8; ++r) {
              _mm512_store_ps(obuf + (r0 + r) * D + 16 * u, acc[r][0]);
              _mm512_store_ps(obuf + (r0 + r) * D + 16 * u + 16, acc[r][1]);
            }
          }
        }
      }
      for (int64_t j0 = 0; AMX && j0 < kblocks; j0 += 8) {
        const int64_t j1 = j0 + 8 < kblocks ? j0 + 8 : kblocks;
        for (int64_t u = 0; u < D / 32; ++u) {
          float* acc = obuf + u * 32;
          if (j0 == 0) {
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
          } else {
            _tile_loadd(0, acc, D * 4);
            _tile_loadd(1, acc + 16, D * 4);
            _tile_loadd(2, acc + 16 * D, D * 4);
            _tile_loadd(3, acc + 16 * D + 16, D * 4);
          }
          for (int64_t j = j0; j < j1; ++j) {
            tile_step<false>(pbuf + 32 * j, pbuf + 16 * skp + 32 * j, skp * 2, vp + ((2 * u) * kblocks + j) * 512,
                             vp + ((2 * u + 1) * kblocks + j) * 512);
          }
          _tile_stored(0, acc, D * 4);
          _tile_stored(1, acc + 16, D * 4);
          _tile_stored(2, acc + 16 * D, D * 4);
          _tile_stored(3, acc + 16 * D + 16, D * 4);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        const __m512 inv = _mm512_set1_ps(rinv[r]);
        uint16_t* orow = out + ((b * Sq + q0 + r) * H + h) * D;
        for (int64_t d = 0; d < D; d += 32) {
          const __m512 y0 = _mm512_mul_ps(_mm512_load_ps(obuf + r * D + d), inv);
          const __m512 y1 = _mm512_mul_ps(_mm512_load_ps(obuf + r * D + d + 16), inv);
          _mm512_storeu_si512(orow + d, _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(y0)),
                                                           (__m256i)_mm512_cvtneps_pbh(y1), 1));
        }
      }
    }
    free(kp);
    free(vp);
    free(sbuf);
    free(pbuf);
    free(qpad);
    free(obuf);
    if constexpr (AMX) _tile_release();
  }
}

extern "C" TGT void mgtq_attention_amx(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* key_bias,
                                      uint16_t* out, int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t D,
                                      const int64_t* qst, const int64_t* kst, const int64_t* vst, float scale,
                                      int64_t nthreads) {
  attention_impl<true>(q, k, v, key_bias, out, B, H, Sq, Sk, D, qst, kst, vst, scale, nthreads);
}

extern "C" TGT void mgtq_attention_avx512(const uint16_t* q, const uint16_t* k, const uint16_t* v,
                                         const float* key_bias, uint16_t* out, int64_t B, int64_t H, int64_t Sq,
                                         int64_t Sk, int64_t D, const int64_t* qst, const int64_t* kst,
                                         const int64_t* vst, float scale, int64_t nthreads) {
  attention_impl<false>(q, k, v, key_bias, out, B, H, Sq, Sk, D, qst, kst, vst, scale, nthreads);
}
// Attention's RMS QK-norm then RoPE, one pass per row of D (a multiple of 16): x (B, H, N, D) bf16 by element strides
// {batch, head, row}, out likewise; w (D) fp32; cos/sin fp32 with strides {batch (0: shared), row}, each frequency
// twice (interleaved pairs). As the torch chain it replaces (QKNorm's eager path): y = x * (1 / sqrt(mean(x^2) + eps))
// * w in fp32, then per pair (a, b) -> (a c - b s, b c + a s) with each product rounded (a complex product), then bf16.
// Only the sum of squares runs in another order than torch's mean.
extern "C" TGT void mgtq_qknorm_rope(const uint16_t* x, const int64_t* xst, uint16_t* out, const int64_t* ost,
                                    const float* w, const float* cosv, const float* sinv, const int64_t* cst,
                                    int64_t B, int64_t H, int64_t N, int64_t D, float eps, int64_t nthreads) {
  const __mmask16 even = 0x5555;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t row = 0; row < B * H * N; ++row) {
    const int64_t b = row / (H * N), h = (row / N) % H, n = row % N;
    const uint16_t* xr = x + b * xst[0] + h * xst[1] + n * xst[2];
    uint16_t* orow = out + b * ost[0] + h * ost[1] + n * ost[2];
    const float* cr = cosv + b * cst[0] + n * cst[1];
    const float* sr = sinv + b * cst[0] + n * cst[1];
    __m512 ss = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 v = load_bf16(xr + d);
      ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
    }
    const float r = 1.0f / sqrtf(_mm512_reduce_add_ps(ss) * (1.0f / (float)D) + eps);  // mean as torch: sum x 1/D
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 v = load_bf16(xr + d);
      const __m512 y = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(r)), _mm512_loadu_ps(w + d));
      const __m512 p1 = _mm512_mul_ps(y, _mm512_loadu_ps(cr + d));                         // a c | b c
      const __m512 p2 = _mm512_mul_ps(_mm512_permute_ps(y, 0xB1), _mm512_loadu_ps(sr + d));  // b s | a s
      const __m512 o = _mm512_mask_sub_ps(_mm512_add_ps(p1, p2), even, p1, p2);             // a c - b s | b c + a s
      _mm256_storeu_si256((__m256i*)(orow + d), (__m256i)_mm512_cvtneps_pbh(o));
    }
  }
}
// RMSNorm over rows of D (a multiple of 16), x and out (R, D) bf16 contiguous, w (D) bf16: as diffusers' RMSNorm in
// bf16, y = bf16(bf16(x * r) * w) with r = 1 / sqrt(mean(x^2) + eps) in fp32 (its two roundings: the normed value is
// cast to the weight's dtype before the product). Only the sum of squares runs in another order than torch's mean.
extern "C" TGT void mgtq_rms_norm(const uint16_t* x, uint16_t* out, const uint16_t* w, int64_t R, int64_t D, float eps,
                                  int64_t nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t row = 0; row < R; ++row) {
    const uint16_t* xr = x + row * D;
    uint16_t* orow = out + row * D;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 v = load_bf16(xr + d);
      ss = _mm512_add_ps(ss, _mm512_mul_ps(v, v));
    }
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) * (1.0f / (float)D) + eps));
    for (int64_t d = 0; d < D; d += 16) {
      const __m512 normed = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(_mm512_mul_ps(load_bf16(xr + d), r)));
      _mm256_storeu_si256((__m256i*)(orow + d),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(normed, load_bf16(w + d))));
    }
  }
}
"""


def _x86_linux() -> bool:
    return platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")


def _has_amx_int8() -> bool:
    # The real hardware, not MGTQ_CPU_CLASS: forcing the class on a CPU without AMX must not run tile code.
    return _x86_linux() and "amx_int8" in cpu_flags()


def _has_avx512_vnni() -> bool:
    # What every kernel of the library needs (each AMX CPU has it too); the real hardware, as above.
    return _x86_linux() and {"avx512f", "avx512bw", "avx512_vnni"} <= cpu_flags()


@functools.lru_cache(maxsize=None)
def _has_avx512_bf16() -> bool:
    # Read once: attention asks on every call.
    return "avx512_bf16" in cpu_flags()


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL | None:
    """The built kernel library, or None where it cannot run here (a CPU that has what the kernels need but
    cannot build them is said once: it loses most of mgtq's CPU speed)."""
    if not _has_avx512_vnni():
        return None
    try:
        from torch._inductor.codecache import CppCodeCache

        from mgtq.compilation import inductor_cache_for_builds

        with inductor_cache_for_builds():  # built once per torch version, kept across reboots
            lib = CppCodeCache.load(_SOURCE)
    except Exception as err:  # no compiler, headers or Inductor: torch's kernels still run
        warnings.warn(f"mgtq's AVX-512 CPU kernels cannot be built here ({(str(err).splitlines() or [''])[0][:200]}); "
                      "torch's kernels run instead: the same results within rounding, slower. Install a C++ "
                      "compiler (g++) for them", RuntimeWarning, stacklevel=2)
        return None
    lib.mgtq_w4a8_amx.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7
    lib.mgtq_w4a8_amx.restype = None
    lib.mgtq_w4a8_vnni.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 7
    lib.mgtq_w4a8_vnni.restype = None
    lib.mgtq_quantize_int8.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p,
                                       ctypes.c_int64, ctypes.c_int64]
    lib.mgtq_quantize_int8.restype = None
    lib.mgtq_w4a16_amx.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                   ctypes.c_void_p] + [ctypes.c_int64] * 6
    lib.mgtq_w4a16_amx.restype = None
    lib.mgtq_w4a16_avx512.argtypes = lib.mgtq_w4a16_amx.argtypes
    lib.mgtq_w4a16_avx512.restype = None
    lib.mgtq_attention_amx.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 5 + [ctypes.c_void_p] * 3 + [
        ctypes.c_float, ctypes.c_int64]
    lib.mgtq_attention_amx.restype = None
    lib.mgtq_attention_avx512.argtypes = lib.mgtq_attention_amx.argtypes
    lib.mgtq_attention_avx512.restype = None
    lib.mgtq_qknorm_rope.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int64] * 4 + [ctypes.c_float, ctypes.c_int64]
    lib.mgtq_qknorm_rope.restype = None
    lib.mgtq_rms_norm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float, ctypes.c_int64]
    lib.mgtq_rms_norm.restype = None
    return lib


@functools.lru_cache(maxsize=None)
def _amx_library() -> ctypes.CDLL | None:
    """The library where its AMX kernels may run: an AMX-int8 CPU whose kernel grants AMX tile state."""
    lib = _library()
    if lib is None or not _has_amx_int8():
        return None
    if not lib.mgtq_amx_init():
        log.debug("mgtq AMX kernel: the kernel refused AMX tile state (arch_prctl); using torch's kernels")
        return None
    return lib


@torch.compiler.assume_constant_result
def available() -> bool:
    """Whether this machine has AMX-int8 and the kernels built and got AMX permission (built on first call)."""
    return _amx_library() is not None


@torch.compiler.assume_constant_result
def avx512_bf16_available() -> bool:
    """Whether the AVX512-BF16 kernels (:func:`attention` with ``tiles=False``, :func:`w4a16_avx512_linear`) may run
    here: the library built on a CPU with AVX512-BF16 (AMD Zen 4, Intel Cooper Lake and every AMX CPU)."""
    return _library() is not None and _has_avx512_bf16()


@torch.compiler.assume_constant_result
def vnni_available() -> bool:
    """Whether the AVX512-VNNI kernels (:func:`w4a8_vnni_linear`, :func:`quantize_int8`) built and may run here:
    an x86-64 Linux CPU with AVX512-BW and AVX512-VNNI (the ``avx512-vnni`` class and every AMX CPU)."""
    return _library() is not None


def supports(k: int, n: int, out_dtype: torch.dtype) -> bool:
    """Shapes and dtypes the kernel takes: K a multiple of 128 (two 64-input tiles per packed byte run),
    N a multiple of 32 (two 16-column tiles), bf16 or fp32 output."""
    return k > 0 and n > 0 and k % (2 * TILE_K) == 0 and n % BLOCK_N == 0 and out_dtype in (torch.bfloat16,
                                                                                            torch.float32)


def supports_w4a16(k: int, n: int, group_size: int, dtype: torch.dtype) -> bool:
    """The W4A16 kernel's shapes: as :func:`supports`, bf16 activations, groups a multiple of 16 inputs."""
    return supports(k, n, dtype) and dtype == torch.bfloat16 and group_size % 16 == 0 and k % group_size == 0


def supports_w4a16_avx512(k: int, n: int, group_size: int, dtype: torch.dtype) -> bool:
    """The AVX512-BF16 W4A16 kernel's shapes: as :func:`supports_w4a16`, N a multiple of 64 (its register block)."""
    return supports_w4a16(k, n, group_size, dtype) and n % VNNI_BLOCK_N == 0


def chunk_n(k: int, n: int) -> int:
    """Output columns per chunk: about ``CHUNK_BYTES`` of unpacked weight, a multiple of 32, at most N."""
    return max(BLOCK_N, min(n, CHUNK_BYTES // k // BLOCK_N * BLOCK_N))


def supports_vnni(k: int, n: int, out_dtype: torch.dtype) -> bool:
    """Shapes and dtypes the AVX512-VNNI W4A8 kernel takes: K a multiple of 128 (as :func:`supports`), N a
    multiple of 64 (its 64-column register block), bf16 or fp32 output."""
    return supports(k, n, out_dtype) and n % VNNI_BLOCK_N == 0


def vnni_chunk_n(k: int, n: int) -> int:
    """Output columns per chunk of the VNNI kernel: about ``CHUNK_BYTES`` of unpacked weight, a multiple
    of 64, at most N."""
    return max(VNNI_BLOCK_N, min(n, CHUNK_BYTES // k // VNNI_BLOCK_N * VNNI_BLOCK_N))


def _gelu_flag(activation: str | None) -> int:
    if activation not in (None, "gelu_tanh"):
        raise ValueError(f"the AMX kernels fuse 'gelu_tanh' only, got {activation!r}")
    return int(activation == "gelu_tanh")


def _checked_library(amx_tiles: bool = True) -> ctypes.CDLL:
    lib = _library()
    if lib is not None and amx_tiles and _amx_library() is None:
        lib = None
    if lib is None:
        what = "AMX" if amx_tiles else "AVX512-VNNI"
        raise RuntimeError(f"mgtq's {what} kernel is not available on this machine (see mgtq.native.amx)")
    return lib


def _bf16_library() -> ctypes.CDLL:
    """The library where its AVX512-BF16 kernels may run (no AMX tiles needed), else a clear error."""
    if not avx512_bf16_available():
        raise RuntimeError("mgtq's AVX512-BF16 kernels are not available on this machine (see mgtq.native.amx)")
    return _library()


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bf16 / fp32 ``x (..., K)`` -> int8 ``(M, K)`` in one pass, as
    :func:`mgtq.quantization.qtensor.quantize_int8_per_tensor`
    (``clamp(round(x_fp32 * (1 / scale)))``, round-half-even; a NaN becomes -128 here)."""
    lib = _checked_library(amx_tiles=False)
    if x.dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"the AMX quantizer takes bf16 or fp32 activations, got {x.dtype}")
    x = x.contiguous()
    out = torch.empty(x.numel() // x.shape[-1], x.shape[-1], dtype=torch.int8)
    inv = float(torch.reciprocal(scale.to(torch.float32)))  # IEEE reciprocal, as the torch quantizer
    lib.mgtq_quantize_int8(x.data_ptr(), int(x.dtype == torch.bfloat16), inv, out.data_ptr(), x.numel(),
                           torch.get_num_threads())
    return out


def w4a8_linear(x_q: torch.Tensor, packed: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None,
                out_dtype: torch.dtype, activation: str | None = None) -> torch.Tensor:
    """``(x_q @ q.T) * col_scale + bias`` as :func:`mgtq.quantization.qtensor.int8_int4_linear`, on AMX tiles.

    x_q: int8 ``(M, K)``; packed: uint8 ``(N, K/2)``; col_scale: ``(N,)`` (input scale x weight scale);
    bias: ``(N,)`` or None. ``activation``: ``"gelu_tanh"`` applied to the fp32 result before the cast, or None.
    Needs :func:`available` and :func:`supports`.
    """
    return _w4a8(x_q, packed, col_scale, bias, out_dtype, activation, tiles=True)


def _w4a8(x_q: torch.Tensor, packed: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None,
          out_dtype: torch.dtype, activation: str | None, tiles: bool) -> torch.Tensor:
    """Both W4A8 GEMMs' checks and call: on AMX tiles (``tiles``) or on AVX512-VNNI."""
    lib = _checked_library(amx_tiles=tiles)
    m, k = x_q.shape
    n = packed.shape[0]
    if x_q.dtype != torch.int8 or packed.dtype != torch.uint8 or packed.shape[1] * 2 != k:
        raise ValueError(f"expected int8 x (M, K) and uint8 packed (N, K/2), got {x_q.dtype} {tuple(x_q.shape)} "
                         f"and {packed.dtype} {tuple(packed.shape)}")
    if not (supports if tiles else supports_vnni)(k, n, out_dtype):
        name, block = ("AMX", BLOCK_N) if tiles else ("VNNI", VNNI_BLOCK_N)
        raise ValueError(f"the {name} kernel needs K % 128 == 0, N % {block} == 0 and a bf16/fp32 output, "
                         f"got K={k}, N={n}, {out_dtype}")
    out = torch.empty(m, n, dtype=out_dtype)
    if m == 0:
        return out
    x_q = x_q.contiguous()
    packed = packed.contiguous()
    scale16 = (col_scale.to(torch.float32) * (1.0 / 16.0)).contiguous()  # the 16 of 16q, exact
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    entry, chunk = (lib.mgtq_w4a8_amx, chunk_n) if tiles else (lib.mgtq_w4a8_vnni, vnni_chunk_n)
    entry(x_q.data_ptr(), packed.data_ptr(), scale16.data_ptr(), None if bias32 is None else bias32.data_ptr(),
          out.data_ptr(), m, k, n, int(out_dtype == torch.bfloat16), _gelu_flag(activation), chunk(k, n),
          torch.get_num_threads())
    return out


def w4a8_vnni_linear(x_q: torch.Tensor, packed: torch.Tensor, col_scale: torch.Tensor, bias: torch.Tensor | None,
                     out_dtype: torch.dtype, activation: str | None = None) -> torch.Tensor:
    """:func:`w4a8_linear` on AVX512-VNNI (``vpdpbusd``) for CPUs without AMX, bit for bit the same result.

    Needs :func:`vnni_available` and :func:`supports_vnni`.
    """
    return _w4a8(x_q, packed, col_scale, bias, out_dtype, activation, tiles=False)


def w4a16_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 activation: str | None = None) -> torch.Tensor:
    """bf16 ``x (M, K)`` times the int4 weight dequantized to bf16 on the fly (``(N, G)`` scales), + bias, in bf16.

    The weights are the bf16 values of :func:`mgtq.quantization.qtensor.dequantize_int4_weight`; the products are summed
    in fp32 on AMX tiles, in another order than oneDNN's bf16 GEMM (the same kind of difference as
    between two GEMM libraries). ``activation``: as in :func:`w4a8_linear`. Needs :func:`available` and
    :func:`supports_w4a16`.
    """
    return _w4a16(x, packed, scale, bias, activation, tiles=True)


def w4a16_avx512_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                        activation: str | None = None) -> torch.Tensor:
    """:func:`w4a16_linear` on AVX512-BF16 (``vdpbf16ps``) for CPUs without AMX: the same bf16 weights and fp32
    sums, summed in another order. Needs :func:`avx512_bf16_available` and :func:`supports_w4a16_avx512`."""
    return _w4a16(x, packed, scale, bias, activation, tiles=False)


def _w4a16(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
           activation: str | None, tiles: bool) -> torch.Tensor:
    """Both W4A16 GEMMs' checks and call: on AMX tiles (``tiles``) or on AVX512-BF16."""
    lib = _checked_library() if tiles else _bf16_library()
    m, k = x.shape
    n, groups = packed.shape[0], scale.shape[1]
    if x.dtype != torch.bfloat16 or packed.dtype != torch.uint8 or packed.shape[1] * 2 != k:
        raise ValueError(f"expected bf16 x (M, K) and uint8 packed (N, K/2), got {x.dtype} {tuple(x.shape)} and "
                         f"{packed.dtype} {tuple(packed.shape)}")
    if not (supports_w4a16 if tiles else supports_w4a16_avx512)(k, n, k // groups, x.dtype):
        name, block = ("AMX", BLOCK_N) if tiles else ("AVX512-BF16", VNNI_BLOCK_N)
        raise ValueError(f"the {name} W4A16 kernel needs K % 128 == 0, N % {block} == 0, groups of a multiple of 16 "
                         f"inputs and bf16 activations, got K={k}, N={n}, group {k // groups}, {x.dtype}")
    out = torch.empty(m, n, dtype=torch.bfloat16)
    if m == 0:
        return out
    x = x.contiguous()
    scale16 = (scale.to(torch.float32) * (1.0 / 16.0)).contiguous()
    bias32 = None if bias is None else bias.to(torch.float32).contiguous()
    # chunks of about CHUNK_BYTES of bf16 weights: 2 bytes per input
    entry, chunk = (lib.mgtq_w4a16_amx, chunk_n) if tiles else (lib.mgtq_w4a16_avx512, vnni_chunk_n)
    entry(x.data_ptr(), packed.contiguous().data_ptr(), scale16.data_ptr(), groups,
          None if bias32 is None else bias32.data_ptr(), out.data_ptr(), m, k, n, _gelu_flag(activation),
          chunk(2 * k, n), torch.get_num_threads())
    return out


# Keys per call at most: one thread's score rows (32 x keys fp32) and packed keys/values stay L2-sized.
MAX_KEYS = 16384


def supports_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None) -> bool:
    """Inputs :func:`attention` takes: bf16 ``(B, H, S, D)`` q, k, v with a contiguous last dim, D a multiple
    of 32, at most ``MAX_KEYS`` keys, and no bias or one floating-point bias per key, ``(B, 1, 1, Sk)``."""
    if not all(t.dtype == torch.bfloat16 and t.dim() == 4 and t.stride(-1) == 1 for t in (q, k, v)):
        return False
    (b, h, _, d), sk = q.shape, k.shape[2]
    if k.shape != (b, h, sk, d) or v.shape != (b, h, sk, d) or d % 32 or not 0 < sk <= MAX_KEYS or k.stride(2) % 2:
        return False
    return key_bias is None or (key_bias.is_floating_point() and key_bias.dim() == 4 and key_bias.shape[1:3] == (1, 1)
                                and key_bias.shape[3] == sk and key_bias.shape[0] in (1, b))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: torch.Tensor | None = None,
              tiles: bool = True) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=key_bias)`` for bf16 q, k, v ``(B, H, S, D)`` on AMX tiles
    (``tiles=False``: the same algorithm on AVX512-BF16's ``vdpbf16ps``, for CPUs without AMX).

    Scale ``1 / sqrt(D)``; ``key_bias``: None or ``(B or 1, 1, 1, Sk)``, added to every query's logits of that
    key. Returns ``(B, H, Sq, D)`` as a view of a contiguous ``(B, Sq, H, D)`` tensor (what the model's
    output projection reads, so ``.transpose(1, 2).flatten(2)`` needs no copy). Scores and the softmax in
    fp32, probabilities rounded to bf16 for the second product (as torch's CPU flash attention); results
    differ from SDPA's by the order of fp32 sums and the exp approximation, within bf16 rounding. Needs
    :func:`available` (``tiles=False``: :func:`avx512_bf16_available`) and :func:`supports_attention`.
    """
    lib = _checked_library() if tiles else _bf16_library()
    if not supports_attention(q, k, v, key_bias):
        raise ValueError(f"the AMX attention takes bf16 (B, H, S, D) q/k/v with D % 32 == 0, at most {MAX_KEYS} keys "
                         f"and a (B, 1, 1, Sk) key bias, got q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}, bias {None if key_bias is None else tuple(key_bias.shape)}")
    b, h, sq, d = q.shape
    sk = k.shape[2]
    out = torch.empty(b, sq, h, d, dtype=torch.bfloat16)
    bias2 = None
    if key_bias is not None:  # (B, keys rounded up to 32) fp32 in base 2, -inf past the last key
        skp = (sk + 31) // 32 * 32
        bias2 = torch.full((b, skp), float("-inf"), dtype=torch.float32)
        scaled = key_bias.reshape(-1, sk).to(torch.float64) * 1.4426950408889634
        # a finite bias stays finite in fp32 (a mask of finfo.min times log2(e) would overflow to -inf)
        bias2[:, :sk] = torch.where(scaled.isfinite(), scaled.clamp_min(-torch.finfo(torch.float32).max), scaled)
    strides = torch.tensor([q.stride()[:3], k.stride()[:3], v.stride()[:3]], dtype=torch.int64)
    entry = lib.mgtq_attention_amx if tiles else lib.mgtq_attention_avx512
    entry(q.data_ptr(), k.data_ptr(), v.data_ptr(), None if bias2 is None else bias2.data_ptr(),
          out.data_ptr(), b, h, sq, sk, d, strides[0].data_ptr(), strides[1].data_ptr(),
          strides[2].data_ptr(), d ** -0.5, torch.get_num_threads())
    return out.transpose(1, 2)


def supports_qknorm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Inputs :func:`qknorm_rope` takes: bf16 ``x (B, H, N, D)`` with a contiguous last dim, D a multiple of 16,
    fp32 ``cos``/``sin`` of ``(N, D)`` or ``(B, N, D)`` with a contiguous last dim, a ``(D,)`` weight."""
    if x.dtype != torch.bfloat16 or x.dim() != 4 or x.stride(-1) != 1 or x.shape[-1] % 16:
        return False
    b, _, n, d = x.shape
    tables_ok = all(t.dtype == torch.float32 and t.stride(-1) == 1 and t.shape[-2:] == (n, d)
                    and (t.dim() == 2 or (t.dim() == 3 and t.shape[0] == b)) for t in (cos, sin))
    return tables_ok and cos.shape == sin.shape and cos.stride() == sin.stride() and weight.shape == (d,)


def qknorm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
    """RoPE(RMSNorm(x) * weight) in one pass per row, as QKNorm's eager torch chain (fp32 inside, one rounding
    to bf16; only the sum of squares adds in another order). ``cos``/``sin``: rope_tables' interleaved
    tables, shared ``(N, D)`` or per sample ``(B, N, D)``. The output has x's strides. Needs
    :func:`avx512_bf16_available` (no AMX tiles) and :func:`supports_qknorm_rope`."""
    lib = _bf16_library()
    if not supports_qknorm_rope(x, weight, cos, sin):
        raise ValueError(f"the fused QK-norm takes bf16 x (B, H, N, D) with D % 16 == 0 and fp32 (N, D) or (B, N, D) "
                         f"tables, got x {tuple(x.shape)} {x.dtype}, cos {tuple(cos.shape)} {cos.dtype}")
    b, h, n, d = x.shape
    out = torch.empty_like(x)  # x's layout (dense: the heads view of a projection's output)
    w = weight.to(torch.float32).contiguous()
    strides = torch.tensor([x.stride()[:3], out.stride()[:3],
                            (cos.stride(0) if cos.dim() == 3 else 0, cos.stride(-2), 0)], dtype=torch.int64)
    lib.mgtq_qknorm_rope(x.data_ptr(), strides[0].data_ptr(), out.data_ptr(), strides[1].data_ptr(), w.data_ptr(),
                         cos.data_ptr(), sin.data_ptr(), strides[2].data_ptr(), b, h, n, d, eps,
                         torch.get_num_threads())
    return out


def supports_rms_norm(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Inputs :func:`rms_norm` takes: contiguous bf16 ``x (..., D)``, D a multiple of 16, a bf16 ``(D,)`` weight."""
    return (x.dtype == weight.dtype == torch.bfloat16 and x.dim() >= 1 and x.shape[-1] % 16 == 0
            and x.is_contiguous() and weight.shape == (x.shape[-1],))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """diffusers' RMSNorm of bf16 ``x`` with a bf16 weight in one pass per row: ``bf16(bf16(x * r) * weight)``,
    ``r = rsqrt(mean(x²) + eps)`` in fp32, its two roundings; only the sum of squares adds in another order.
    Needs :func:`avx512_bf16_available` (no AMX tiles) and :func:`supports_rms_norm`."""
    lib = _bf16_library()
    if not supports_rms_norm(x, weight):
        raise ValueError(f"the fused RMSNorm takes contiguous bf16 x (..., D) with D % 16 == 0 and a bf16 (D,) "
                         f"weight, got x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}")
    out = torch.empty_like(x)
    w = weight.contiguous()
    d = x.shape[-1]
    lib.mgtq_rms_norm(x.data_ptr(), out.data_ptr(), w.data_ptr(), x.numel() // d, d, eps, torch.get_num_threads())
    return out
