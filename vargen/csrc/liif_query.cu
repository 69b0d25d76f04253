// LIIF's local-ensemble gather: for each corner shift, the nearest feature vector, the query's offset
// from that feature's centre and the cell size (both in feature cells), as the MLP input, plus the
// corner's area. Mirrors query_rgb's grid_sample(mode="nearest", align_corners=False) calls and its
// float arithmetic step by step (explicit _rn intrinsics where torch rounds each op).
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

constexpr int kThreads = 256;  // one warp per (corner, sample, query)
constexpr int kMaxShifts = 4;

struct Shifts {
  float row[kMaxShifts];
  float col[kMaxShifts];
};

// make_coord's pixel centre i of n: (-1 + r) + (2 r) * i with r = 1 / n, each term rounded to float
struct Centres {
  float base;
  float step;
  __device__ __forceinline__ float at(int i) const { return __fadd_rn(__fmul_rn(step, static_cast<float>(i)), base); }
};

// grid_sample's nearest source index (align_corners=False, zeros padding), as ATen's CUDA kernel
__device__ __forceinline__ int nearest_index(float coord, int size) {
  const float ix = ((coord + 1.f) * size - 1) / 2;
  return static_cast<int>(nearbyintf(ix));
}

__global__ void __launch_bounds__(kThreads)
liif_corners_kernel(const float* __restrict__ feat, int64_t fs_b, int64_t fs_c, int64_t fs_h, int64_t fs_w, int C,
                    int h, int w, const float* __restrict__ coord, const float* __restrict__ cell, int64_t BQ,
                    int64_t points, Shifts shifts, float lo, float hi, Centres rows, Centres cols, int Q,
                    float* __restrict__ inp, float* __restrict__ areas) {
  const int lane = threadIdx.x & 31;
  const int64_t point = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (point >= points) return;  // whole warps leave together; no block barriers below
  const int s = static_cast<int>(point / BQ);
  const int64_t bq = point % BQ;
  const int64_t b = bq / Q;
  const int D = C + (cell != nullptr ? 4 : 2);

  const float c0 = coord[bq * 2], c1 = coord[bq * 2 + 1];
  const float s0 = fminf(fmaxf(__fadd_rn(c0, shifts.row[s]), lo), hi);  // coord_ += shift; clamp_
  const float s1 = fminf(fmaxf(__fadd_rn(c1, shifts.col[s]), lo), hi);
  const int iy = nearest_index(s0, h), ix = nearest_index(s1, w);  // grid is (x, y) = (col, row)
  const bool inside = iy >= 0 && iy < h && ix >= 0 && ix < w;

  float* o = inp + point * D;
  if (inside) {
    const float* f = feat + b * fs_b + iy * fs_h + ix * fs_w;
    for (int ch = lane; ch < C; ch += 32) o[ch] = f[ch * fs_c];
  } else {
    for (int ch = lane; ch < C; ch += 32) o[ch] = 0.f;
  }
  if (lane == 0) {
    const float qy = inside ? rows.at(iy) : 0.f, qx = inside ? cols.at(ix) : 0.f;
    const float rel0 = __fmul_rn(__fsub_rn(c0, qy), static_cast<float>(h));
    const float rel1 = __fmul_rn(__fsub_rn(c1, qx), static_cast<float>(w));
    o[C] = rel0;
    o[C + 1] = rel1;
    if (cell != nullptr) {
      o[C + 2] = __fmul_rn(cell[bq * 2], static_cast<float>(h));
      o[C + 3] = __fmul_rn(cell[bq * 2 + 1], static_cast<float>(w));
    }
    areas[point] = __fadd_rn(fabsf(__fmul_rn(rel0, rel1)), 1e-9f);
  }
}

Centres centres(int n) {
  const double r = 2.0 / (2.0 * n);  // make_coord: (v1 - v0) / (2 n)
  return Centres{static_cast<float>(-1.0 + r), static_cast<float>(2.0 * r)};
}

}  // namespace

std::vector<at::Tensor> liif_corners_cuda(const at::Tensor& feat, const at::Tensor& coord,
                                             const c10::optional<at::Tensor>& cell,
                                             const std::vector<double>& shift_rows,
                                             const std::vector<double>& shift_cols) {
  TORCH_CHECK(feat.is_cuda() && feat.dim() == 4 && feat.scalar_type() == at::kFloat,
              "liif_corners: feat must be a CUDA float32 [B, C, h, w] tensor");
  const int64_t B = feat.size(0), C = feat.size(1), h = feat.size(2), w = feat.size(3);
  TORCH_CHECK(coord.is_cuda() && coord.device() == feat.device() && coord.scalar_type() == at::kFloat &&
                  coord.dim() == 3 && coord.size(0) == B && coord.size(2) == 2 && coord.is_contiguous(),
              "liif_corners: coord must be a contiguous CUDA float32 [B, Q, 2] tensor");
  const int64_t Q = coord.size(1);
  if (cell.has_value())
    TORCH_CHECK(cell->is_cuda() && cell->device() == feat.device() && cell->scalar_type() == at::kFloat &&
                    cell->sizes() == coord.sizes() && cell->is_contiguous(),
                "liif_corners: cell must be a contiguous CUDA float32 tensor shaped like coord");
  const int64_t S = static_cast<int64_t>(shift_rows.size());
  TORCH_CHECK(S >= 1 && S <= kMaxShifts && shift_cols.size() == shift_rows.size(), "liif_corners: 1 to 4 shifts");
  TORCH_CHECK(C < INT_MAX && h < INT_MAX && w < INT_MAX && Q < INT_MAX, "liif_corners: sizes too large");

  Shifts shifts{};
  for (int64_t i = 0; i < S; ++i) {  // torch adds a Python float to a float tensor as a float
    shifts.row[i] = static_cast<float>(shift_rows[i]);
    shifts.col[i] = static_cast<float>(shift_cols[i]);
  }
  const c10::cuda::CUDAGuard guard(feat.device());
  const int64_t D = C + (cell.has_value() ? 4 : 2);
  auto inp = at::empty({S, B, Q, D}, feat.options());
  auto areas = at::empty({S, B, Q}, feat.options());
  const int64_t points = S * B * Q;
  if (points == 0) return {inp, areas};
  const int64_t per_block = kThreads / 32;
  const int64_t blocks = (points + per_block - 1) / per_block;
  TORCH_CHECK(blocks < INT_MAX, "liif_corners: too many queries for one launch");
  liif_corners_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      feat.data_ptr<float>(), feat.stride(0), feat.stride(1), feat.stride(2), feat.stride(3), static_cast<int>(C),
      static_cast<int>(h), static_cast<int>(w), coord.data_ptr<float>(),
      cell.has_value() ? cell->data_ptr<float>() : nullptr, B * Q, points, shifts,
      static_cast<float>(-1 + 1e-6), static_cast<float>(1 - 1e-6), centres(static_cast<int>(h)),
      centres(static_cast<int>(w)), static_cast<int>(Q), inp.data_ptr<float>(), areas.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {inp, areas};
}

}  // namespace vargen
