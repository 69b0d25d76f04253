// Speculative verification of a window of drafts, fused: accept, first rejection, residual/bonus draw.
//
// One block per sample. accept_j = coins_j * q_j(d_j) < p_j(d_j) + extra_j and valid_j; r = drafts
// accepted before the first rejection; the token is argmax(dist / noise) with dist the residual
// norm(max(p_r - q_r, 0)) (p_r when that mass is 0) if r < L, else p_L. Nothing leaves the device.
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

__global__ void __launch_bounds__(kThreads)
verify_window_kernel(const float* __restrict__ probs, const float* __restrict__ q, const int64_t* __restrict__ drafts,
                     const float* __restrict__ coins, const bool* __restrict__ valid, const float* __restrict__ noise,
                     const float* __restrict__ extra, int64_t* __restrict__ r_out, int64_t* __restrict__ x_out, int L,
                     int V) {
  __shared__ int red_i[32];
  __shared__ float red_f[32];
  __shared__ int red_ai[32];
  const int64_t b = blockIdx.x;

  int first = L;
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    const int64_t cell = b * L + j;
    const int64_t d = drafts[cell];
    bool ok = false;
    if (d >= 0 && d < V) {
      const float qd = q[cell * V + d];
      const float pd = probs[(b * (L + 1) + j) * V + d];
      const float target = extra != nullptr ? __fadd_rn(pd, extra[cell]) : pd;
      ok = __fmul_rn(coins[cell], qd) < target && valid[cell];
    }
    if (!ok) first = min(first, j);
  }
  const int r = block_reduce(first, Min(), red_i);

  const float* p = probs + (b * (L + 1) + r) * V;
  const float* e = noise + b * V;
  ArgMax best = argmax_init();
  bool use_residual = false;
  float mass = 0.f;
  const float* qr = q + (b * L + min(r, L - 1)) * V;
  if (r < L) {  // r is the same in the whole block, so the reductions below are uniform
    for (int i = threadIdx.x; i < V; i += blockDim.x) mass += fmaxf(__fsub_rn(p[i], qr[i]), 0.f);
    mass = block_reduce(mass, Sum(), red_f);
    use_residual = mass > 0.f;
  }
  if (use_residual) {
    const float denom = fmaxf(mass, 1e-30f);
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float dist = __fdiv_rn(fmaxf(__fsub_rn(p[i], qr[i]), 0.f), denom);
      best = argmax_combine(best, ArgMax{__fdiv_rn(dist, e[i]), i});
    }
  } else {
    for (int i = threadIdx.x; i < V; i += blockDim.x) best = argmax_combine(best, ArgMax{__fdiv_rn(p[i], e[i]), i});
  }
  best = block_argmax(best, red_f, red_ai);
  if (threadIdx.x == 0) {
    r_out[b] = r;
    x_out[b] = best.i;
  }
}

}  // namespace

std::vector<at::Tensor> verify_window_cuda(const at::Tensor& probs, const at::Tensor& q,
                                              const at::Tensor& drafts, const at::Tensor& coins,
                                              const at::Tensor& valid, const at::Tensor& noise,
                                              const c10::optional<at::Tensor>& extra) {
  TORCH_CHECK(q.dim() == 3, "verify_window: q must be [B, L, V]");
  const int64_t B = q.size(0), L = q.size(1), V = q.size(2);
  TORCH_CHECK(L > 0 && V > 0 && V < INT_MAX && L < INT_MAX, "verify_window: bad window/vocabulary size");
  auto check = [&](const at::Tensor& t, at::ScalarType dtype, at::IntArrayRef shape, const char* name) {
    TORCH_CHECK(t.is_cuda() && t.device() == q.device(), "verify_window: ", name, " must be on ", q.device());
    TORCH_CHECK(t.scalar_type() == dtype, "verify_window: ", name, " must be ", dtype, ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == shape, "verify_window: ", name, " must have shape ", shape, ", got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "verify_window: ", name, " must be contiguous");
  };
  check(probs, at::kFloat, {B, L + 1, V}, "probs");
  check(q, at::kFloat, {B, L, V}, "q");
  check(drafts, at::kLong, {B, L}, "drafts");
  check(coins, at::kFloat, {B, L}, "coins");
  check(valid, at::kBool, {B, L}, "valid");
  check(noise, at::kFloat, {B, V}, "noise");
  if (extra.has_value()) check(*extra, at::kFloat, {B, L}, "extra");

  const c10::cuda::CUDAGuard guard(q.device());
  auto r = at::empty({B}, drafts.options());
  auto x = at::empty({B}, drafts.options());
  if (B == 0) return {r, x};
  verify_window_kernel<<<static_cast<unsigned>(B), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      probs.data_ptr<float>(), q.data_ptr<float>(), drafts.data_ptr<int64_t>(), coins.data_ptr<float>(),
      valid.data_ptr<bool>(), noise.data_ptr<float>(), extra.has_value() ? extra->data_ptr<float>() : nullptr,
      r.data_ptr<int64_t>(), x.data_ptr<int64_t>(), static_cast<int>(L), static_cast<int>(V));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {r, x};
}

}  // namespace vargen
