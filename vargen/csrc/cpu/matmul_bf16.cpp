// vargen CPU kernels: bf16 inference matmuls (any number of rows times a weight) with AVX-512 BF16.
//
// A batch-1 decode step multiplies 1-4 rows by every weight once: a weight stream, whose floor is the weight's
// bytes over the memory bandwidth, and oneDNN's prepacked bf16 path reads weights at ~20 GB/s on the 2-core EPYC
// these presets are timed on, where a plain read runs at ~55 GB/s. A verify pass (17-72 tokens, both CFG halves)
// is compute-bound, and oneDNN reached ~83% of this CPU's bf16 peak there at the default model's shapes.
//
// One layout serves both (pack_weight): the weight is cut into panels of 64 output rows (the last one 16, 32 or 48
// when N is not a multiple of 64), and each panel stored as [K / 2][NB][16][2], i.e. for every pair of input
// features, 16 NB outputs x 2 bf16 in the order VDPBF16PS reads them. The whole weight is one sequential stream.
// The micro-kernel (tile) keeps MR x NB fp32 accumulator registers, broadcasts each row's feature pair and
// multiplies it into NB registers of the panel: a classic register-blocked GEMM, at the measured bf16 peak
// (~395 GFLOP/s on 2 threads) from ~18 rows on, and a sequential weight stream below that. Each output is
// accumulated in fp32 and rounded to bf16 once (round to nearest even), as oneDNN does; the sums' order differs,
// so the last bf16 place can. Only the kernel functions are compiled for AVX-512 BF16 (target attributes);
// `supported()` says whether this CPU runs them, so the module imports anywhere.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

namespace vargen_cpu {

constexpr int NB = 4;               // 16-wide fp32 accumulator registers per row of a full panel's tile
constexpr int64_t PANEL = 16 * NB;  // output features per full panel
constexpr int MR = 4;               // rows per tile: 4 x 4 accumulators + 4 panel registers + 1 broadcast

#define VARGEN_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

template <int M, int BLOCKS>
VARGEN_AVX512_BF16 static void tile(const at::BFloat16* x, const at::BFloat16* panel, at::BFloat16* y, int64_t K,
                                    int64_t N) {
  // x: M rows of K features; panel: [K / 2][BLOCKS][16][2]; y: M rows of N outputs, at this panel's first column
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
      const __m512bh a = (__m512bh)_mm512_set1_epi32(x32[m * pairs + p]);
#pragma GCC unroll 4
      for (int j = 0; j < BLOCKS; ++j) acc[m][j] = _mm512_dpbf16_ps(acc[m][j], a, w[j]);
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int j = 0; j < BLOCKS; ++j)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + 16 * j), (__m256i)_mm512_cvtneps_pbh(acc[m][j]));
}

template <int BLOCKS>
static void panel_rows(const at::BFloat16* x, const at::BFloat16* panel, at::BFloat16* y, int64_t M, int64_t K,
                       int64_t N) {
  // every row against one panel: after the first tile the panel is read from L2, so the weight leaves DRAM once
  int64_t m = 0;
  for (; m + MR <= M; m += MR) tile<MR, BLOCKS>(x + m * K, panel, y + m * N, K, N);
  switch (M - m) {
    case 1: tile<1, BLOCKS>(x + m * K, panel, y + m * N, K, N); break;
    case 2: tile<2, BLOCKS>(x + m * K, panel, y + m * N, K, N); break;
    case 3: tile<3, BLOCKS>(x + m * K, panel, y + m * N, K, N); break;
    default: break;
  }
}

bool supported() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16"); }

torch::Tensor pack_weight(const torch::Tensor& weight) {
  // [N, K] -> the kernel's layout, same shape and bytes: panel p holds outputs 64p..64p+63, pair by pair of K
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == torch::kBFloat16, "pack_weight: a 2-D bf16 weight");
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(N % 16 == 0 && K % 2 == 0, "pack_weight: out features must be a multiple of 16 and in features ",
              "even, got ", N, " x ", K);
  const int64_t full = N / PANEL * PANEL, tail = (N - full) / 16;
  auto panels = weight.narrow(0, 0, full).reshape({full / PANEL, NB, 16, K / 2, 2}).permute({0, 3, 1, 2, 4});
  auto last = weight.narrow(0, full, N - full).reshape({tail, 16, K / 2, 2}).permute({2, 0, 1, 3});
  return torch::cat({panels.reshape(-1), last.reshape(-1)}).view({N, K});
}

torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& packed) {
  // x [..., K], packed: pack_weight's output [N, K] -> [..., N] bf16
  TORCH_CHECK(supported(), "vargen_cpu.linear needs a CPU with AVX-512 BF16");
  TORCH_CHECK(x.scalar_type() == torch::kBFloat16 && packed.scalar_type() == torch::kBFloat16 &&
              !x.is_cuda() && !packed.is_cuda(), "vargen_cpu.linear: bf16 CPU tensors");
  const int64_t K = packed.size(1), N = packed.size(0);
  TORCH_CHECK(x.size(-1) == K, "vargen_cpu.linear: input has ", x.size(-1), " features, the weight ", K);
  TORCH_CHECK(packed.is_contiguous() && N % 16 == 0 && K % 2 == 0, "vargen_cpu.linear: weight not packed");
  const auto xs = x.reshape({-1, K}).contiguous();
  const int64_t M = xs.size(0);
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  auto y = torch::empty(sizes, x.options());
  const auto* X = xs.data_ptr<at::BFloat16>();
  const auto* W = packed.data_ptr<at::BFloat16>();
  auto* Y = y.data_ptr<at::BFloat16>();
  if (M == 0) return y;
  // panels split across torch's intra-op threads (torch.set_num_threads); the last may be narrower
  const int64_t full = N / PANEL, tail = (N % PANEL) / 16;
  at::parallel_for(0, full + (tail > 0), 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const auto* panel = W + p * PANEL * K;
      auto* y = Y + p * PANEL;
      switch (p < full ? NB : tail) {
        case 4: panel_rows<4>(X, panel, y, M, K, N); break;
        case 3: panel_rows<3>(X, panel, y, M, K, N); break;
        case 2: panel_rows<2>(X, panel, y, M, K, N); break;
        default: panel_rows<1>(X, panel, y, M, K, N); break;
      }
    }
  });
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
  m.doc() = "vargen CPU kernels: bf16 inference matmuls on a weight laid out as one sequential stream of panels";
  m.def("supported", &vargen_cpu::supported, "whether this CPU runs the AVX-512 BF16 kernels");
  m.def("pack_weight", &vargen_cpu::pack_weight, "[N, K] bf16 weight -> the kernel's layout", py::arg("weight"));
  m.def("linear", &vargen_cpu::linear, "x [..., K] @ packed weight^T -> [..., N] bf16", py::arg("x"),
        py::arg("packed"));
}
