// vargen CPU kernels: the elementwise steps of a LlamaGen block (RMSNorm, RoPE, SwiGLU's gate, the KV-cache
// write) in one op each.
//
// In eager bf16 inference on the CPU, a batch-1 decode step of the default model spent more time launching ops
// than computing: each of these steps was 4-8 aten ops (casts to fp32 and back, pow, mean, rsqrt, flip, ...) at
// ~5 us of dispatch each. Here each is one pass over the rows in fp32 with the same roundings to bf16 as the
// PyTorch code they replace (vargen/models/llamagen.py, rope.py); sums may differ in the last fp32 bit.
#include "kernels.h"
#include "simd.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <cstring>

namespace vargen_cpu {

namespace {

VARGEN_AVX512_BF16 void rms_norm_rows(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t rows,
                                      int64_t D, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const at::BFloat16* xr = x + r * D;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t i = 0; i < D; i += 16) {
      const __m512 v = load_bf16(xr + i, lanes(i, D));
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 scale = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(D) + eps));
    for (int64_t i = 0; i < D; i += 16) {
      const __mmask16 k = lanes(i, D);
      // (x * rsqrt(mean(x^2) + eps)) rounded to bf16, then times the bf16 weight, rounded again: as the module
      const __m512 n = load_bf16(xr + i, k);
      store_bf16(y + r * D + i, _mm512_mul_ps(round_bf16(_mm512_mul_ps(n, scale)), load_bf16(w + i, k)), k);
    }
  }
}

VARGEN_AVX512_BF16 void rope_rows(const at::BFloat16* x, const float* cos, const float* sin, at::BFloat16* y,
                                  int64_t heads, int64_t D) {
  // one token: x [heads, D] in interleaved pairs, cos / sin [D] as rope_factors makes them ([c, c], [-s, s]):
  // y = x * cos + swap(x) * sin in fp32
  const __m512i swap = _mm512_set_epi32(14, 15, 12, 13, 10, 11, 8, 9, 6, 7, 4, 5, 2, 3, 0, 1);
  for (int64_t h = 0; h < heads; ++h)
    for (int64_t i = 0; i < D; i += 16) {
      const __mmask16 k = lanes(i, D);
      const __m512 v = load_bf16(x + h * D + i, k);
      const __m512 a = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(k, cos + i));
      const __m512 b = _mm512_mul_ps(_mm512_permutexvar_ps(swap, v), _mm512_maskz_loadu_ps(k, sin + i));
      store_bf16(y + h * D + i, _mm512_add_ps(a, b), k);
    }
}

VARGEN_AVX512_BF16 void silu_mul_rows(const at::BFloat16* a, const at::BFloat16* b, at::BFloat16* y, int64_t n) {
  // bf16(bf16(silu(a)) * b): SwiGLU's gate as F.silu(w1 x) * w3 x computes it in bf16
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = lanes(i, n);
    const __m512 x = load_bf16(a + i, k);
    const __m512 s = round_bf16(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(
        _mm512_setzero_ps(), x)))));
    store_bf16(y + i, _mm512_mul_ps(s, load_bf16(b + i, k)), k);
  }
}

void check_bf16(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kBFloat16 && !t.is_cuda() && t.is_contiguous(), "vargen_cpu.", what,
              ": contiguous bf16 CPU tensors");
}

}  // namespace

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(supported(), "vargen_cpu.rms_norm needs a CPU with AVX-512 BF16");
  check_bf16(weight, "rms_norm");
  const auto xs = x.contiguous();
  check_bf16(xs, "rms_norm");
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "vargen_cpu.rms_norm: weight has ", weight.numel(),
              " features, the input ", D);
  auto y = torch::empty_like(xs);
  const int64_t rows = D ? xs.numel() / D : 0;
  const auto* X = xs.data_ptr<at::BFloat16>();
  const auto* W = weight.data_ptr<at::BFloat16>();
  auto* Y = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    rms_norm_rows(X + r0 * D, W, Y + r0 * D, r1 - r0, D, static_cast<float>(eps));
  });
  return y;
}

torch::Tensor rope(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  // x [B, T, H, D] bf16 (heads contiguous, tokens at any stride: q and k as a view of the qkv matmul's output);
  // cos / sin [B, T, 1, D / 2, 2] fp32 (rope_factors) -> [B, T, H, D] bf16, contiguous
  TORCH_CHECK(supported(), "vargen_cpu.rope needs a CPU with AVX-512 BF16");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && !x.is_cuda() && x.dim() == 4 && x.size(3) % 2 == 0,
              "vargen_cpu.rope: x must be a bf16 CPU tensor [B, T, H, D] with D even");
  const int64_t B = x.size(0), T = x.size(1), H = x.size(2), D = x.size(3);
  TORCH_CHECK(x.stride(3) == 1 && x.stride(2) == D, "vargen_cpu.rope: each token's heads must be contiguous");
  const auto c = cos.contiguous(), s = sin.contiguous();
  TORCH_CHECK(c.scalar_type() == torch::kFloat && s.scalar_type() == torch::kFloat && c.numel() == B * T * D &&
              s.numel() == B * T * D, "vargen_cpu.rope: cos and sin must be fp32 with ", D, " factors per token");
  auto y = torch::empty({B, T, H, D}, x.options());
  const auto* X = x.data_ptr<at::BFloat16>();
  const float* C = c.data_ptr<float>();
  const float* S = s.data_ptr<float>();
  auto* Y = y.data_ptr<at::BFloat16>();
  const int64_t sb = x.stride(0), st = x.stride(1);
  at::parallel_for(0, B * T, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0; i < t1; ++i)
      rope_rows(X + (i / T) * sb + (i % T) * st, C + i * D, S + i * D, Y + i * H * D, H, D);
  });
  return y;
}

torch::Tensor silu_mul(const torch::Tensor& a, const torch::Tensor& b) {
  TORCH_CHECK(supported(), "vargen_cpu.silu_mul needs a CPU with AVX-512 BF16");
  const auto as = a.contiguous(), bs = b.contiguous();
  check_bf16(as, "silu_mul");
  check_bf16(bs, "silu_mul");
  TORCH_CHECK(as.sizes() == bs.sizes(), "vargen_cpu.silu_mul: shapes differ, ", as.sizes(), " and ", bs.sizes());
  auto y = torch::empty_like(as);
  const auto* A = as.data_ptr<at::BFloat16>();
  const auto* Bp = bs.data_ptr<at::BFloat16>();
  auto* Y = y.data_ptr<at::BFloat16>();
  at::parallel_for(0, as.numel(), 4096, [&](int64_t i0, int64_t i1) {
    silu_mul_rows(A + i0, Bp + i0, Y + i0, i1 - i0);
  });
  return y;
}

void write_kv(torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots, const torch::Tensor& k,
              const torch::Tensor& v) {
  // k / v [B, T, H, D] (each head's D contiguous) into the caches [B, H, L, D] at slots [B, T]; a negative slot
  // counts from the end, as in the indexing it replaces
  TORCH_CHECK(k_cache.scalar_type() == k.scalar_type() && v_cache.scalar_type() == v.scalar_type() &&
              k.scalar_type() == torch::kBFloat16 && v.scalar_type() == torch::kBFloat16 && !k.is_cuda(),
              "vargen_cpu.write_kv: bf16 CPU caches and values");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 4 &&
              k_cache.sizes() == v_cache.sizes(), "vargen_cpu.write_kv: contiguous caches [B, H, L, D]");
  const int64_t B = k_cache.size(0), H = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3);
  TORCH_CHECK(slots.scalar_type() == torch::kLong && slots.dim() == 2 && slots.size(0) == B,
              "vargen_cpu.write_kv: slots must be int64 [B, T]");
  const int64_t T = slots.size(1);
  TORCH_CHECK(k.sizes() == v.sizes() && k.dim() == 4 && k.size(0) == B && k.size(1) == T && k.size(2) == H &&
              k.size(3) == D && k.stride(3) == 1 && v.stride(3) == 1,
              "vargen_cpu.write_kv: keys and values must be [B, T, H, D] to match the cache and slots");
  const auto idx = slots.contiguous();
  const int64_t* S = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i)
    TORCH_CHECK(S[i] >= -L && S[i] < L, "vargen_cpu.write_kv: slot ", S[i], " outside a cache of ", L);
  auto* Kc = k_cache.data_ptr<at::BFloat16>();
  auto* Vc = v_cache.data_ptr<at::BFloat16>();
  const auto* Kx = k.data_ptr<at::BFloat16>();
  const auto* Vx = v.data_ptr<at::BFloat16>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t s = S[b * T + t] < 0 ? S[b * T + t] + L : S[b * T + t];
      for (int64_t h = 0; h < H; ++h) {
        const int64_t dst = ((b * H + h) * L + s) * D;
        std::memcpy(Kc + dst, Kx + b * k.stride(0) + t * k.stride(1) + h * k.stride(2), D * sizeof(at::BFloat16));
        std::memcpy(Vc + dst, Vx + b * v.stride(0) + t * v.stride(1) + h * v.stride(2), D * sizeof(at::BFloat16));
      }
    }
}

}  // namespace vargen_cpu
