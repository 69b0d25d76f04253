// Shared device helpers: deterministic block reductions, argmax with torch's tie rules, float keys.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

namespace vargen {

constexpr unsigned kFullMask = 0xffffffffu;

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct Min {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? a : b; }
};

// Every thread gets the result. blockDim.x must be a multiple of 32 (at most 1024) and `scratch`
// hold 32 values. The combination order is fixed, so results are deterministic run to run;
// xor-butterfly partners combine (a, b) and (b, a), which is bitwise equal for + and max.
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();  // the previous reduction may still be reading scratch
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
  for (int i = 1; i < warps; ++i) r = op(r, scratch[i]);
  return r;
}

// torch.argmax order: NaN beats everything, then larger values, ties go to the lower index.
struct ArgMax {
  float v;
  int i;
};

__device__ __forceinline__ bool argmax_before(float v, int i, float bv, int bi) {
  const bool vn = isnan(v), bn = isnan(bv);
  if (vn != bn) return vn;
  if (!vn && v != bv) return v > bv;
  return i < bi;
}

__device__ __forceinline__ ArgMax argmax_combine(ArgMax a, ArgMax b) {
  return argmax_before(b.v, b.i, a.v, a.i) ? b : a;
}

__device__ __forceinline__ ArgMax argmax_init() { return ArgMax{-INFINITY, INT_MAX}; }

__device__ __forceinline__ ArgMax block_argmax(ArgMax a, float* scratch_v, int* scratch_i) {
  for (int o = 16; o > 0; o >>= 1) {
    ArgMax other{__shfl_xor_sync(kFullMask, a.v, o), __shfl_xor_sync(kFullMask, a.i, o)};
    a = argmax_combine(a, other);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  __syncthreads();
  if (lane == 0) {
    scratch_v[warp] = a.v;
    scratch_i[warp] = a.i;
  }
  __syncthreads();
  ArgMax r{scratch_v[0], scratch_i[0]};
  for (int i = 1; i < warps; ++i) r = argmax_combine(r, ArgMax{scratch_v[i], scratch_i[i]});
  return r;
}

// Order-preserving int32 image of a float (signed compare == float compare, -0 == +0), so
// thresholds can be found by bisection over ints.
__device__ __forceinline__ int float_key(float x) {
  if (x == 0.f) x = 0.f;
  const int b = __float_as_int(x);
  return b ^ ((b >> 31) & 0x7fffffff);
}

}  // namespace vargen
