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
#include "kernels.h"
#include "tile.h"

#include <ATen/Parallel.h>

namespace vargen_cpu {

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
      panel_rows(p < full ? NB : tail, X, K, M, panel, K, y, N);
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
