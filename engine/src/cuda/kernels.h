// Launchers of the project's CUDA kernels (kernels.cu, compiled by nvcc). Plain C types only, so the nvcc
// translation unit needs no LibTorch headers. SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <cstdint>

struct CUstream_st;

namespace liveavatar::cuda::kernels {

enum class Dtype { kFloat32, kBFloat16 };

/// x [rows, cols] (contiguous) -> q [rows, cols] e4m3 bytes and scale (1 float per tensor, or `rows` floats):
/// scale = max(amax, 1e-12) / 448, q = satfinite_rne(x / scale). `amax` is scratch of 1 (per tensor) or `rows`
/// floats. Returns a cudaError_t value (0 = success).
int quantize_fp8_e4m3(const void* x, Dtype dtype, int64_t rows, int64_t cols, bool per_row, float* amax,
                      uint8_t* q, float* scale, CUstream_st* stream);

}  // namespace liveavatar::cuda::kernels
