// The ATen reference of the FP8 quantisation (any device, any build). SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>

#include "cuda/cuda.h"

namespace liveavatar::cuda {

std::pair<at::Tensor, at::Tensor> quantize_fp8_reference(const at::Tensor& x, bool per_row) {
  const auto xf = x.to(at::kFloat);
  const auto amax = per_row ? xf.abs().amax({-1}, /*keepdim=*/true) : xf.abs().max();
  const auto scale = amax.clamp_min(1e-12) / 448.0;
  const auto q = (xf / scale).clamp(-448.0, 448.0).to(at::kFloat8_e4m3fn);
  return {q, scale};
}

}  // namespace liveavatar::cuda
