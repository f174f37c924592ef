// liveavatar-run-module: runs one DiT module, or the streaming DiT loop, on tensors from a .safetensors file.
// The logic is a library so that the golden tests run exactly what the tool runs.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/core/Tensor.h>

#include <map>
#include <string>
#include <vector>

namespace liveavatar::dit::tool {

using TensorMap = std::map<std::string, at::Tensor>;

struct RunRequest {
  std::string module;        // see modules_help()
  std::string weights;       // checkpoint directory (index.json or one .safetensors + config.json) or a .safetensors
  std::string config;        // config.json ("" : <weights dir>/config.json if present, else --tiny or 14B defaults)
  bool tiny = false;         // ModelConfig::tiny() when no config.json is given
  uint64_t seed = 0;         // random weights when `weights` is empty
};

/// The modules and their inputs / outputs (for --help).
std::string modules_help();

/// Runs `request.module` on `inputs`; returns every output tensor by name. Throws liveavatar::Error.
TensorMap run(const RunRequest& request, const TensorMap& inputs);

}  // namespace liveavatar::dit::tool
