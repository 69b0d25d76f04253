// The register-blocked bf16 micro-kernel shared by vargen's CPU matmul and attention (see matmul_bf16.cpp for the
// packed panel layout it reads).
#pragma once
#include "simd.h"

#include <type_traits>

namespace vargen_cpu {

constexpr int NB = 4;               // 16-wide fp32 accumulator registers per row of a full panel's tile
constexpr int64_t PANEL = 16 * NB;  // output features per full panel
constexpr int MR = 4;               // rows per tile: 4 x 4 accumulators + 4 panel registers + 1 broadcast

template <int M, int BLOCKS, typename Out>
VARGEN_AVX512_BF16 inline void tile(const at::BFloat16* x, int64_t ldx, const at::BFloat16* panel, int64_t K, Out* y,
                                    int64_t ldy) {
  // x: M rows of K features (row stride ldx, even); panel: [K / 2][BLOCKS][16][2]; y: M rows (stride ldy) at this
  // panel's first output. Out = at::BFloat16 rounds each fp32 sum once (nearest even); float keeps it.
  __m512 acc[M][BLOCKS];
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < BLOCKS; ++j) acc[m][j] = _mm512_setzero_ps();
  const int64_t pairs = K / 2;
  const auto* x32 = reinterpret_cast<const int32_t*>(x);  // one int32 = one pair of bf16 features
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh w[BLOCKS];
#pragma GCC unroll 4
    for (int j = 0; j < BLOCKS; ++j) w[j] = (__m512bh)_mm512_loadu_si512(panel + (p * BLOCKS + j) * 32);
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(x32[m * (ldx / 2) + p]);
#pragma GCC unroll 4
      for (int j = 0; j < BLOCKS; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], a, w[j]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < BLOCKS; ++j) {
      if constexpr (std::is_same_v<Out, float>)
        _mm512_storeu_ps(y + m * ldy + 16 * j, acc[m][j]);
      else
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * ldy + 16 * j), (__m256i)_mm512_cvtneps_pbh(acc[m][j]));
    }
}

template <int BLOCKS, typename Out>
inline void panel_rows_of(const at::BFloat16* x, int64_t ldx, int64_t M, const at::BFloat16* panel, int64_t K,
                          Out* y, int64_t ldy) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<MR, BLOCKS>(x + m * ldx, ldx, panel, K, y + m * ldy, ldy);
  switch (M - m) {
    case 1: tile<1, BLOCKS>(x + m * ldx, ldx, panel, K, y + m * ldy, ldy); break;
    case 2: tile<2, BLOCKS>(x + m * ldx, ldx, panel, K, y + m * ldy, ldy); break;
    case 3: tile<3, BLOCKS>(x + m * ldx, ldx, panel, K, y + m * ldy, ldy); break;
    default: break;
  }
}

template <typename Out>
inline void panel_rows(int blocks, const at::BFloat16* x, int64_t ldx, int64_t M, const at::BFloat16* panel,
                       int64_t K, Out* y, int64_t ldy) {
  // every row against one panel of `blocks` 16-output blocks: after the first tile the panel is read from L2 (or
  // L1), so it leaves DRAM once
  switch (blocks) {
    case 4: return panel_rows_of<4>(x, ldx, M, panel, K, y, ldy);
    case 3: return panel_rows_of<3>(x, ldx, M, panel, K, y, ldy);
    case 2: return panel_rows_of<2>(x, ldx, M, panel, K, y, ldy);
    default: return panel_rows_of<1>(x, ldx, M, panel, K, y, ldy);
  }
}

}  // namespace vargen_cpu
