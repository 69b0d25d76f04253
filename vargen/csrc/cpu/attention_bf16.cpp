// vargen CPU kernels: attention of a decode or verify step's few queries over the KV cache, bf16 in and out.
//
// A step's queries (1 for AR, 17-72 for a verify window, per sample and CFG half) attend to the cache's slots in
// use. SDPA's CPU flash kernel spent ~140-290 us per layer on the default model's verify shapes (2 x 6 heads x 17
// queries x 160-272 slots, ~14 MFLOP), and vargen's fp32 single-query path copied the whole cache to fp32 in every
// layer of every AR step. Here each (sample, head) is one task. Up to DIRECT_QUERIES queries read the keys and
// values where they lie (VDPBF16PS dot products, fp32 sums of the values). More queries: the keys are gathered
// into the matmul kernel's panel layout (tile.h) and multiplied by the queries into fp32 scores. Either way the
// mask, a max-subtracted softmax in fp32 and the 1/sum follow in AVX-512, the probabilities are rounded to bf16 (as
// SDPA's flash kernel does for bf16) and multiplied by the values (packed as pairs of slots for many queries) into
// fp32 sums rounded to bf16 once.
#include "kernels.h"
#include "tile.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace vargen_cpu {

namespace {

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Up to this many queries per sample the keys and values are read where they lie: packing them costs ~S x D gathers
// per (sample, head) whatever T is, more than T <= 8 queries' products (2 x 6 heads x 150 slots: 16 us against 29 for
// one query; at batch 16 under CFG 292 us against 628 over 276 slots)
constexpr int64_t DIRECT_QUERIES = 8;

VARGEN_AVX512_BF16 void pack_keys(const at::BFloat16* k, int64_t ldk, int64_t S, int64_t D, at::BFloat16* out) {
  // keys [S, D] (row stride ldk) -> pack_weight's layout of a [round_up(S, 16), D] matrix, slots past S zero
  const int64_t S16 = round_up(S, 16), pairs = D / 2;
  const auto* k32 = reinterpret_cast<const int32_t*>(k);
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(static_cast<int32_t>(ldk / 2)));
  for (int64_t l0 = 0; l0 < S16; l0 += PANEL) {
    const int blocks = static_cast<int>(std::min<int64_t>(PANEL, S16 - l0) / 16);
    at::BFloat16* panel = out + l0 * D;
    for (int64_t p = 0; p < pairs; ++p)
      for (int j = 0; j < blocks; ++j) {
        const int64_t first = l0 + 16 * j;
        const __mmask16 valid = first >= S ? 0 : static_cast<__mmask16>((1u << std::min<int64_t>(16, S - first)) - 1);
        const __m512i v = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, rows,
                                                      k32 + first * (ldk / 2) + p, 4);
        _mm512_storeu_si512(panel + (p * blocks + j) * 32, v);
      }
  }
}

VARGEN_AVX512_BF16 void pack_values(const at::BFloat16* v, int64_t ldv, int64_t S, int64_t D, at::BFloat16* out) {
  // values [S, D] -> pack_weight's layout of values^T [D, round_up(S, 2)]: per pair of slots, D x 2 interleaved
  const int64_t S2 = round_up(S, 2);
  const __m512i idx = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                       37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  for (int64_t d0 = 0; d0 < D; d0 += PANEL) {
    const int blocks = static_cast<int>(std::min<int64_t>(PANEL, D - d0) / 16);
    at::BFloat16* panel = out + d0 * S2;
    for (int64_t q = 0; q < S2 / 2; ++q) {
      const at::BFloat16* a = v + 2 * q * ldv + d0;
      const bool second = 2 * q + 1 < S;
      for (int j = 0; j < blocks; ++j) {
        const __m512i x = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16 * j)));
        const __m512i y = second ? _mm512_castsi256_si512(
                                       _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + ldv + 16 * j)))
                                 : _mm512_setzero_si512();
        _mm512_storeu_si512(panel + (q * blocks + j) * 32, _mm512_permutex2var_epi16(x, idx, y));
      }
    }
  }
}

VARGEN_AVX512_BF16 void softmax_rows(float* scores, const bool* mask, int64_t T, int64_t S, int64_t ld,
                                     float scale, at::BFloat16* probs) {
  // scores [T, ld] fp32 -> probs [T, ld] bf16: softmax over the first S slots where mask [T, S] is true, 0 elsewhere
  // (a query with no slot to attend gets zeros)
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < T; ++t) {
    float* s = scores + t * ld;
    const bool* m = mask + t * S;
    __m512 vmax = ninf;
    for (int64_t l = 0; l < S; l += 16) {
      const __mmask16 in = l + 16 <= S ? 0xFFFF : static_cast<__mmask16>((1u << (S - l)) - 1);
      const __mmask16 keep = _mm_mask_test_epi8_mask(in, _mm_maskz_loadu_epi8(in, m + l), _mm_set1_epi8(1));
      const __m512 x = _mm512_mask_mul_ps(ninf, keep, _mm512_loadu_ps(s + l), _mm512_set1_ps(scale));
      _mm512_storeu_ps(s + l, x);
      vmax = _mm512_max_ps(vmax, x);
    }
    const float mx = _mm512_reduce_max_ps(vmax);
    if (mx == -std::numeric_limits<float>::infinity()) {
      for (int64_t l = 0; l < ld; ++l) probs[t * ld + l] = at::BFloat16(0.0f);
      continue;
    }
    __m512 vsum = _mm512_setzero_ps();
    const __m512 vmx = _mm512_set1_ps(mx);
    for (int64_t l = 0; l < S; l += 16) {
      const __m512 x = _mm512_loadu_ps(s + l);
      const __mmask16 live = _mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ);  // masked slots (and padding) stay 0
      const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(x, vmx)));
      _mm512_storeu_ps(s + l, e);
      vsum = _mm512_add_ps(vsum, e);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    for (int64_t l = 0; l < ld; l += 16) {
      const __m512 e = l < S ? _mm512_mul_ps(_mm512_loadu_ps(s + l), inv) : _mm512_setzero_ps();
      const __mmask16 in = l + 16 <= S ? 0xFFFF : (l >= S ? 0 : static_cast<__mmask16>((1u << (S - l)) - 1));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(probs + t * ld + l),
                          (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_mov_ps(in, e)));
    }
  }
}

VARGEN_AVX512_BF16 void direct_scores(const at::BFloat16* q, const at::BFloat16* k, int64_t ldk, int64_t S,
                                      int64_t D, float* scores) {
  // scores[l] = q . k_l for a few queries: fp32 sums of bf16 products read straight from the cache (no packing)
  for (int64_t l = 0; l < S; ++l) {
    const at::BFloat16* kl = k + l * ldk;
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __mmask32 in = D - d >= 32 ? ~static_cast<__mmask32>(0) : static_cast<__mmask32>((1u << (D - d)) - 1);
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_maskz_loadu_epi16(in, q + d),
                             (__m512bh)_mm512_maskz_loadu_epi16(in, kl + d));
    }
    scores[l] = _mm512_reduce_add_ps(acc);
  }
}

VARGEN_AVX512_BF16 void direct_values(const at::BFloat16* probs, const at::BFloat16* v, int64_t ldv, int64_t S,
                                      int64_t D, at::BFloat16* out) {
  // out = sum_l probs[l] v_l in fp32, 64 features at a time, rounded to bf16 once
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const int blocks = static_cast<int>(std::min<int64_t>(64, D - d0) / 16);
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t l = 0; l < S; ++l) {
      const float p = static_cast<float>(probs[l]);
      if (p == 0.0f) continue;  // masked slots
      const __m512 bp = _mm512_set1_ps(p);
      const at::BFloat16* vl = v + l * ldv + d0;
      for (int j = 0; j < blocks; ++j) acc[j] = _mm512_fmadd_ps(bp, load_bf16(vl + 16 * j, 0xFFFF), acc[j]);
    }
    for (int j = 0; j < blocks; ++j) store_bf16(out + d0 + 16 * j, acc[j], 0xFFFF);
  }
}

}  // namespace

torch::Tensor attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                        const torch::Tensor& mask, double scale) {
  // q [B, T, H, D], k / v [B, Hk, S, D] (H a multiple of Hk; last dims contiguous), mask [B, T, S] bool (true =
  // attend) -> [B, T, H * D] bf16
  TORCH_CHECK(supported(), "vargen_cpu.attention needs a CPU with AVX-512 BF16");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && mask.dim() == 3,
              "vargen_cpu.attention: q [B, T, H, D], k and v [B, Hk, S, D], mask [B, T, S]");
  TORCH_CHECK(q.scalar_type() == torch::kBFloat16 && k.scalar_type() == torch::kBFloat16 &&
              v.scalar_type() == torch::kBFloat16 && mask.scalar_type() == torch::kBool && !q.is_cuda(),
              "vargen_cpu.attention: bf16 CPU q, k, v and a bool mask");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), Hk = k.size(1), S = k.size(2);
  TORCH_CHECK(D % 16 == 0, "vargen_cpu.attention: head dim must be a multiple of 16, got ", D);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hk > 0 && H % Hk == 0,
              "vargen_cpu.attention: k and v must be [B, Hk, S, D] with H a multiple of Hk");
  TORCH_CHECK(mask.size(0) == B && mask.size(1) == T && mask.size(2) == S, "vargen_cpu.attention: mask must be [",
              B, ", ", T, ", ", S, "], got ", mask.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1 && q.stride(1) % 2 == 0 &&
              k.stride(2) % 2 == 0 && v.stride(2) % 2 == 0, "vargen_cpu.attention: last dims must be contiguous");
  auto out = torch::empty({B, T, H * D}, q.options());
  if (B * T * H == 0 || S == 0) return out.zero_();
  const auto m = mask.contiguous();
  const int64_t S16 = round_up(S, 16), S2 = round_up(S, 2), rep = H / Hk;
  const auto* Q = q.data_ptr<at::BFloat16>();
  const auto* Kc = k.data_ptr<at::BFloat16>();
  const auto* Vc = v.data_ptr<at::BFloat16>();
  const bool* M = m.data_ptr<bool>();
  auto* O = out.data_ptr<at::BFloat16>();
  if (T <= DIRECT_QUERIES) {
    // an AR or ZipAR step's few queries: dot products straight off the cache; packing every (sample, head)'s keys
    // and values for one query cost more than the products (and grew with the batch: 16 images x 2 CFG halves x
    // 6 heads x 8 layers of packing took most of a batch-16 AR step)
    at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> scores(T * S16);
      std::vector<at::BFloat16> probs(T * S16);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / H, h = i % H;
        const at::BFloat16* ks = Kc + b * k.stride(0) + (h / rep) * k.stride(1);
        const at::BFloat16* vs = Vc + b * v.stride(0) + (h / rep) * v.stride(1);
        for (int64_t t = 0; t < T; ++t)
          direct_scores(Q + b * q.stride(0) + t * q.stride(1) + h * q.stride(2), ks, k.stride(2), S, D,
                        scores.data() + t * S16);
        softmax_rows(scores.data(), M + b * T * S, T, S, S16, static_cast<float>(scale), probs.data());
        for (int64_t t = 0; t < T; ++t)
          direct_values(probs.data() + t * S16, vs, v.stride(2), S, D, O + (b * T + t) * H * D + h * D);
      }
    });
    return out;
  }
  at::parallel_for(0, B * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<at::BFloat16> keys(S16 * D), values(S2 * D), probs(T * S16);
    std::vector<float> scores(T * S16);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H;
      const at::BFloat16* qs = Q + b * q.stride(0) + h * q.stride(2);
      pack_keys(Kc + b * k.stride(0) + (h / rep) * k.stride(1), k.stride(2), S, D, keys.data());
      pack_values(Vc + b * v.stride(0) + (h / rep) * v.stride(1), v.stride(2), S, D, values.data());
      for (int64_t l0 = 0; l0 < S16; l0 += PANEL)
        panel_rows(static_cast<int>(std::min<int64_t>(PANEL, S16 - l0) / 16), qs, q.stride(1), T,
                   keys.data() + l0 * D, D, scores.data() + l0, S16);
      softmax_rows(scores.data(), M + b * T * S, T, S, S16, static_cast<float>(scale), probs.data());
      at::BFloat16* o = O + b * T * H * D + h * D;
      for (int64_t d0 = 0; d0 < D; d0 += PANEL)
        panel_rows(static_cast<int>(std::min<int64_t>(PANEL, D - d0) / 16), probs.data(), S16, T,
                   values.data() + d0 * S2, S2, o + d0, H * D);
    }
  });
  return out;
}

torch::Tensor attention_meta(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& mask, double scale) {
  return at::empty({q.size(0), q.size(1), q.size(2) * q.size(3)}, q.options());
}

}  // namespace vargen_cpu
