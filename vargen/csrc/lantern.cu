// LANTERN's pooled neighbour mass: S_m = the largest prefix sum of the draft's neighbours' masses
// (nearest first) that stays within the budget (delta, or (lambda - 1) * p(d)); 0 when p(d) == 0.
//
// One block per row. The prefix sums are accumulated sequentially in double and rounded to float
// at each step, which is exactly what torch's CPU cumsum does for float32, so S_m matches the
// CPU reference bit for bit. The threads only prefetch the gathered masses.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "common.cuh"

namespace vargen {
namespace {

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads)
lantern_pooled_mass_kernel(const float* __restrict__ p, int64_t stride_b, int64_t stride_t, int T,
                           const int64_t* __restrict__ drafts, const int64_t* __restrict__ neighbours, int k, int V,
                           bool lam_mode, float budget_value, float* __restrict__ out) {
  __shared__ float mass[kThreads];
  const int64_t m = blockIdx.x;
  const float* row = p + (m / T) * stride_b + (m % T) * stride_t;
  const int64_t d = drafts[m];
  if (d < 0 || d >= V) {  // the reference would raise on the gather; report no pooled mass
    if (threadIdx.x == 0) out[m] = 0.f;
    return;
  }
  if (!(row[d] > 0.f)) {  // outside the top-k / top-p support: pool nothing (the reference's p(d) > 0 test)
    if (threadIdx.x == 0) out[m] = 0.f;
    return;
  }
  const float budget = lam_mode ? __fmul_rn(row[d], budget_value) : budget_value;
  const int64_t* nb = neighbours + d * k;
  double cum = 0.0;
  float best = 0.f;
  for (int base = 0; base < k; base += blockDim.x) {
    const int j = base + threadIdx.x;
    if (j < k) {
      const int64_t t = nb[j];
      mass[threadIdx.x] = (t >= 0 && t < V) ? row[t] : 0.f;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      const int n = min(static_cast<int>(blockDim.x), k - base);
      for (int i = 0; i < n; ++i) {
        cum += static_cast<double>(mass[i]);
        const float c = static_cast<float>(cum);
        best = fmaxf(best, c <= budget ? c : 0.f);  // amax(cum * (cum <= budget))
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[m] = best;
}

}  // namespace

at::Tensor lantern_pooled_mass_cuda(const at::Tensor& p, const at::Tensor& drafts,
                                       const at::Tensor& neighbours, bool lam_mode, double budget_value) {
  TORCH_CHECK(p.is_cuda() && p.dim() == 3 && p.stride(2) == 1 && p.scalar_type() == at::kFloat,
              "lantern_pooled_mass: p must be a CUDA float32 [B, T, V] tensor with unit last stride");
  const int64_t B = p.size(0), T = p.size(1), V = p.size(2), M = B * T;
  TORCH_CHECK(drafts.is_cuda() && drafts.device() == p.device() && drafts.scalar_type() == at::kLong &&
                  drafts.is_contiguous() && drafts.numel() == M,
              "lantern_pooled_mass: drafts must be a contiguous CUDA long tensor with B * T entries");
  TORCH_CHECK(neighbours.is_cuda() && neighbours.device() == p.device() && neighbours.scalar_type() == at::kLong &&
                  neighbours.dim() == 2 && neighbours.size(0) == V && neighbours.is_contiguous(),
              "lantern_pooled_mass: neighbours must be a contiguous CUDA long [V, k] tensor");
  TORCH_CHECK(V < INT_MAX && T < INT_MAX && neighbours.size(1) < INT_MAX, "lantern_pooled_mass: sizes too large");
  const c10::cuda::CUDAGuard guard(p.device());
  auto out = at::empty({M}, p.options());
  if (M == 0) return out;
  lantern_pooled_mass_kernel<<<static_cast<unsigned>(M), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p.data_ptr<float>(), p.stride(0), p.stride(1), static_cast<int>(T), drafts.data_ptr<int64_t>(),
      neighbours.data_ptr<int64_t>(), static_cast<int>(neighbours.size(1)), static_cast<int>(V), lam_mode,
      static_cast<float>(budget_value), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace vargen
