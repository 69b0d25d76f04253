// Logits -> sampling probabilities in one pass per row: CFG, temperature, top-k, top-p, softmax.
//
// One block per row. Top-k and top-p thresholds are found without sorting: a bisection over the
// order-preserving int keys of the logits, each step one block reduction (a count for top-k, a
// mass for top-p), so the k-th value is exact and ties at it are kept like torch.topk + `<`.
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

constexpr int kThreads = 512;

template <typename scalar_t>
__device__ __forceinline__ float guided(const scalar_t* c, const scalar_t* u, int i, float scale) {
  const float lc = static_cast<float>(c[i]);
  if (u == nullptr) return lc;
  const float lu = static_cast<float>(u[i]);
  return __fadd_rn(lu, __fmul_rn(scale, __fsub_rn(lc, lu)));  // u + s * (c - u), no FMA: as torch
}

// row keeps: its key is >= both thresholds (INT_MIN = no threshold)
__device__ __forceinline__ bool kept(float x, int tk, int tp) {
  const int k = float_key(x);
  return k >= tk && k >= tp;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
sampling_probs_kernel(const scalar_t* __restrict__ logits, float* __restrict__ out, int64_t rows, int V, bool cfg,
                      float scale, bool greedy, float inv_temp, int top_k, float top_p, bool row_in_smem) {
  extern __shared__ float smem_row[];
  __shared__ float red_f[32];
  __shared__ int red_i[32];

  const int64_t row = blockIdx.x;
  const scalar_t* c = logits + row * V;
  const scalar_t* u = cfg ? logits + (row + rows) * V : nullptr;
  float* o = out + row * V;

  if (greedy) {  // temperature 0: one-hot on the argmax of the guided logits
    ArgMax best = argmax_init();
    for (int i = threadIdx.x; i < V; i += blockDim.x) best = argmax_combine(best, ArgMax{guided(c, u, i, scale), i});
    best = block_argmax(best, red_f, red_i);
    for (int i = threadIdx.x; i < V; i += blockDim.x) o[i] = i == best.i ? 1.f : 0.f;
    return;
  }

  // tempered logits live in shared memory when the row fits, else in the output row itself
  float* x = row_in_smem ? smem_row : o;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float l = __fmul_rn(guided(c, u, i, scale), inv_temp);  // torch divides by a scalar as * (1 / t)
    x[i] = l;
    m = fmaxf(m, l);
  }
  m = block_reduce(m, Max(), red_f);  // its __syncthreads also publishes x

  int tk = INT_MIN;
  if (top_k > 0 && top_k < V) {
    // largest key t with count(key >= t) >= k: the k-th largest logit
    int64_t lo = INT_MIN, hi = INT_MAX;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      int count = 0;
      for (int i = threadIdx.x; i < V; i += blockDim.x) count += float_key(x[i]) >= mid;
      count = block_reduce(count, Sum(), red_i);
      if (count >= top_k) lo = mid; else hi = mid - 1;
    }
    tk = static_cast<int>(lo);
  }

  int tp = INT_MIN;
  if (top_p < 1.f) {
    float z = 0.f;
    for (int i = threadIdx.x; i < V; i += blockDim.x)
      if (float_key(x[i]) >= tk) z += expf(x[i] - m);
    z = block_reduce(z, Sum(), red_f);
    const float limit = top_p * z;
    // smallest key t whose strictly-larger kept mass is < top_p: keep key >= t
    int64_t lo = INT_MIN, hi = INT_MAX;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      float above = 0.f;
      for (int i = threadIdx.x; i < V; i += blockDim.x) {
        const int k = float_key(x[i]);
        if (k >= tk && k > mid) above += expf(x[i] - m);
      }
      above = block_reduce(above, Sum(), red_f);
      if (above < limit) hi = mid; else lo = mid + 1;
    }
    tp = static_cast<int>(lo);
  }

  float z = 0.f;
  for (int i = threadIdx.x; i < V; i += blockDim.x)
    if (kept(x[i], tk, tp)) z += expf(x[i] - m);
  z = block_reduce(z, Sum(), red_f);
  // each thread rewrites only the entries it read, so x may alias o
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float l = x[i];
    o[i] = kept(l, tk, tp) ? __fdiv_rn(expf(l - m), z) : 0.f;
  }
}

}  // namespace

at::Tensor sampling_probs_cuda(const at::Tensor& logits, bool cfg, double cfg_scale, double temperature,
                                  int64_t top_k, double top_p) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.is_contiguous(),
              "sampling_probs: logits must be a contiguous CUDA [rows, V] tensor");
  TORCH_CHECK(temperature >= 0, "sampling_probs: temperature must be >= 0");
  const int64_t rows_in = logits.size(0), V = logits.size(1);
  TORCH_CHECK(V > 0 && V < INT_MAX, "sampling_probs: bad vocabulary size ", V);
  TORCH_CHECK(!cfg || rows_in % 2 == 0, "sampling_probs: CFG needs an even number of rows [cond; uncond]");
  const int64_t rows = cfg ? rows_in / 2 : rows_in;
  const c10::cuda::CUDAGuard guard(logits.device());
  auto out = at::empty({rows, V}, logits.options().dtype(at::kFloat));
  if (rows == 0) return out;

  const bool greedy = temperature == 0.0;
  const float inv_temp = greedy ? 1.f : 1.f / static_cast<float>(temperature);
  const int k = (top_k > 0 && top_k < V) ? static_cast<int>(top_k) : 0;
  const size_t row_bytes = static_cast<size_t>(V) * sizeof(float);
  int device = 0, optin = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const bool row_in_smem = !greedy && row_bytes + 1024 <= static_cast<size_t>(optin);  // 1 KB for the static reduction scratch
  const size_t smem = row_in_smem ? row_bytes : 0;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sampling_probs", [&] {
    auto kernel = sampling_probs_kernel<scalar_t>;
    if (smem > 48 * 1024)
      C10_CUDA_CHECK(
          cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    kernel<<<static_cast<unsigned>(rows), kThreads, smem, stream>>>(
        logits.data_ptr<scalar_t>(), out.data_ptr<float>(), rows, static_cast<int>(V), cfg,
        static_cast<float>(cfg_scale), greedy, inv_temp, k, static_cast<float>(top_p), row_in_smem);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace vargen
