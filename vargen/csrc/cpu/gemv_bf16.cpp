// vargen CPU kernels: the batch-1 decode step's matmuls (a few rows times every weight) in bf16.
//
// A decode step multiplies 1-4 rows (batch 1, or 2 rows under CFG) by every weight once, so its matmuls are
// weight streams: their floor is the weight's bytes over the memory bandwidth. oneDNN's prepacked bf16 matmul
// reads weights at ~20 GB/s on the 2-core EPYC these presets are timed on, where a plain read runs at ~55 GB/s.
// This kernel reads a weight laid out for it (pack_weight: R = 4 output rows interleaved in 32-wide chunks of the
// input dimension, so the whole weight is one sequential stream) with AVX-512 BF16 dot products into fp32
// accumulators, and rounds each output to bf16 once, as oneDNN does. Only the kernel functions are compiled for
// AVX-512 BF16 (target attributes); `supported()` says whether this CPU runs them, so the module imports anywhere.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>

namespace vargen_cpu {

constexpr int64_t R = 4;       // output rows interleaved per block
constexpr int64_t CHUNK = 32;  // bf16 lanes of one AVX-512 register

#define VARGEN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512bf16")))

template <int M>
VARGEN_AVX512_BF16 static void block(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t K,
                                     int64_t N, int64_t b) {
  // w: this block's R rows, [K / CHUNK][R][CHUNK]; x: [M, K]; y: [M, N]
  __m512 acc[M][R];
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j)
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) acc[m][j] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += CHUNK) {
    __m512bh xv[M];
#pragma GCC unroll 4
    for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(x + m * K + k);
    const at::BFloat16* wk = w + k * R;
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(wk + j * CHUNK);
#pragma GCC unroll 4
      for (int m = 0; m < M; ++m) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], xv[m], wv);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int j = 0; j < R; ++j) y[m * N + b * R + j] = at::BFloat16(_mm512_reduce_add_ps(acc[m][j]));
}

template <int M>
static void run(const at::BFloat16* x, const at::BFloat16* w, at::BFloat16* y, int64_t K, int64_t N) {
  // blocks split across torch's intra-op threads (torch.set_num_threads), 8 blocks at least per task
  at::parallel_for(0, N / R, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) block<M>(x, w + b * R * K, y, K, N, b);
  });
}

bool supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512bf16"); }

torch::Tensor pack_weight(const torch::Tensor& weight) {
  // [N, K] -> the kernel's layout, same shape and bytes: block b holds rows 4b..4b+3, chunk by chunk of K
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16, "pack_weight: a 2-D bf16 weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % R == 0 && K % CHUNK == 0, "pack_weight: out features must be a multiple of ", R,
              " and in features of ", CHUNK, ", got ", N, " x ", K);
  return weight.reshape({N / R, R, K / CHUNK, CHUNK}).permute({0, 2, 1, 3}).contiguous().view({N, K});
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed) {
  // x [..., K] with at most 4 rows in all, packed: pack_weight's output [N, K] -> [..., N] bf16
  TORCH_CHECK(supported(), "vargen_cpu.linear needs a CPU with AVX-512 BF16");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && packed.scalar_type() == torch::kBFloat16 &&
              !x.is_cuda() && !packed.is_cuda(), "vargen_cpu.linear: bf16 CPU tensors");
  const int64_t K = packed.size(1), N = packed.size(0);
  TORCH_CHECK(x.size(-1) == K, "vargen_cpu.linear: input has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(packed.is_contiguous() && N % R == 0 && K % CHUNK == 0, "vargen_cpu.linear: weight not packed");
  const auto xs = x.reshape({-1, K}).contiguous();
  const int64_t M = xs.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
  const auto* X = xs.data_ptr<at::BFloat16>();
  const auto* W = packed.data_ptr<at::BFloat16>();
  auto* Y = y.data_ptr<at::BFloat16>();
  switch (M) {
    case 0: break;
    case 1: run<1>(X, W, Y, K, N); break;
    case 2: run<2>(X, W, Y, K, N); break;
    case 3: run<3>(X, W, Y, K, N); break;
    case 4: run<4>(X, W, Y, K, N); break;
    default: TORCH_CHECK(false, "vargen_cpu.linear takes at most 4 rows, got ", M);
  }
  return y;
}

torch::Tensor linear_meta(const torch::Tensor& x, const torch::Tensor& packed) {
  auto sizes = x.sizes().vec();
  sizes.back() = packed.size(0);
  return at::empty(sizes, x.options());
}

}  // namespace vargen_cpu

// the same kernel as a dispatcher op, so a compiled graph calls it without a trip through Python
TORCH_LIBRARY(vargen_cpu, m) { m.def("stream_linear(Tensor x, Tensor packed) -> Tensor"); }
TORCH_LIBRARY_IMPL(vargen_cpu, CPU, m) { m.impl("stream_linear", &vargen_cpu::linear); }
TORCH_LIBRARY_IMPL(vargen_cpu, Meta, m) { m.impl("stream_linear", &vargen_cpu::linear_meta); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vargen CPU kernels: bf16 matmuls of a decode step's few rows as one sequential weight stream";
  m.def("supported", &vargen_cpu::supported, "whether this CPU runs the AVX-512 BF16 kernels");
  m.def("pack_weight", &vargen_cpu::pack_weight, "[N, K] bf16 weight -> the kernel's layout", py::arg("weight"));
  m.def("linear", &vargen_cpu::linear, "x [..., K] (at most 4 rows) @ packed weight^T -> [..., N] bf16",
        py::arg("x"), py::arg("packed"));
}
