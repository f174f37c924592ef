// The project's CUDA kernels (nvcc, sm_89 / sm_90). SPDX-License-Identifier: LGPL-2.1-or-later
//
// Dynamic FP8 e4m3 quantisation of activations for at::_scaled_mm: a row-wise absolute maximum, then the scale and
// the saturating cast, in two launches with the scale kept on the device. ATen needs five (abs, amax, div, clamp,
// cast) and a host-visible scalar for the same result.
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "kernels.h"

namespace liveavatar::cuda::kernels {
namespace {

constexpr int kThreads = 256;
constexpr float kE4m3Max = 448.0f;

__device__ inline float load(const float* p, int64_t i) { return p[i]; }
__device__ inline float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }

// For non-negative floats the IEEE bit patterns order like the values, so atomicMax on the int view is a float max.
__device__ inline void atomic_max_nonneg(float* addr, float v) {
  atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
}

// One block per row: the row's absolute maximum, stored (per row) or merged into out[0] (per tensor). NaN inputs
// propagate as NaN (fmaxf would drop them; the reference's amax keeps them).
template <typename T>
__global__ void absmax_rows(const T* __restrict__ x, int64_t cols, bool per_row, float* __restrict__ out) {
  const int64_t row = blockIdx.x;
  const T* r = x + row * cols;
  float m = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = fabsf(load(r, c));
    m = (v > m || v != v) ? v : m;
  }
  for (int offset = 16; offset > 0; offset /= 2) {
    const float o = __shfl_down_sync(0xffffffffu, m, offset);
    m = (o > m || o != o) ? o : m;
  }
  __shared__ float warp_max[kThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_max[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < (blockDim.x + 31) / 32 ? warp_max[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) {
      const float o = __shfl_down_sync(0xffffffffu, m, offset);
      m = (o > m || o != o) ? o : m;
    }
    if (lane == 0) {
      if (per_row) out[row] = m;
      else if (m != m) out[0] = m;  // NaN wins
      else atomic_max_nonneg(out, m);
    }
  }
}

template <typename T>
__global__ void cast_e4m3(const T* __restrict__ x, int64_t rows, int64_t cols, bool per_row,
                          const float* __restrict__ amax, __nv_fp8_e4m3* __restrict__ q, float* __restrict__ scale) {
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = per_row ? i / cols : 0;
    const float a = amax[row];
    const float s = (a != a ? a : fmaxf(a, 1e-12f)) / kE4m3Max;  // NaN stays NaN, as clamp_min keeps it
    // The division (not a multiply by 1 / s) matches the reference bit for bit; the clamp saturates as
    // __NV_SATFINITE does and keeps NaN as NaN.
    float v = __fdiv_rn(load(x, i), s);
    v = fminf(fmaxf(v, -kE4m3Max), kE4m3Max);
    if (load(x, i) != load(x, i)) v = load(x, i);
    q[i] = __nv_fp8_e4m3(v);
    if (i % cols == 0 && (per_row || i == 0)) scale[row] = s;
  }
}

template <typename T>
int launch(const T* x, int64_t rows, int64_t cols, bool per_row, float* amax, uint8_t* q, float* scale,
           cudaStream_t stream) {
  if (!per_row) {
    const cudaError_t e = cudaMemsetAsync(amax, 0, sizeof(float), stream);
    if (e != cudaSuccess) return static_cast<int>(e);
  }
  absmax_rows<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(x, cols, per_row, amax);
  const int64_t n = rows * cols;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  const unsigned grid = static_cast<unsigned>(blocks < 65535 * 8 ? blocks : 65535 * 8);
  cast_e4m3<T><<<grid, kThreads, 0, stream>>>(x, rows, cols, per_row, amax,
                                              reinterpret_cast<__nv_fp8_e4m3*>(q), scale);
  return static_cast<int>(cudaGetLastError());
}

}  // namespace

int quantize_fp8_e4m3(const void* x, Dtype dtype, int64_t rows, int64_t cols, bool per_row, float* amax,
                      uint8_t* q, float* scale, CUstream_st* stream) {
  if (rows <= 0 || cols <= 0) return 0;
  if (dtype == Dtype::kBFloat16)
    return launch(static_cast<const __nv_bfloat16*>(x), rows, cols, per_row, amax, q, scale, stream);
  return launch(static_cast<const float*>(x), rows, cols, per_row, amax, q, scale, stream);
}

}  // namespace liveavatar::cuda::kernels
