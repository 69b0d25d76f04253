// AVX-512 helpers shared by vargen's CPU kernels. Functions that use AVX-512 carry VARGEN_AVX512_BF16 (a target
// attribute): the rest of the module compiles for any x86-64 CPU, and supported() decides at run time.
#pragma once
#include <ATen/ATen.h>
#include <immintrin.h>

namespace vargen_cpu {

#define VARGEN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

VARGEN_AVX512_BF16 inline __m512 load_bf16(const at::BFloat16* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

VARGEN_AVX512_BF16 inline void store_bf16(at::BFloat16* p, __m512 x, __mmask16 k) {
  _mm256_mask_storeu_epi16(p, k, (__m256i)_mm512_cvtneps_pbh(x));
}

inline __mmask16 lanes(int64_t i, int64_t n) {
  return n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (n - i)) - 1);
}

VARGEN_AVX512_BF16 inline __m512 round_bf16(__m512 x) {  // to the nearest bf16 (even on ties), back in fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

VARGEN_AVX512_BF16 inline __m512 exp512(__m512 x) {
  // exp(x) = 2^n exp(r), n = round(x log2 e), r = x - n ln 2 (two-step), |r| <= 0.35: degree-6 Taylor, relative
  // error < 2e-7; x is clamped at -87 (exp underflows there; callers zero what must be exactly 0)
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

}  // namespace vargen_cpu
