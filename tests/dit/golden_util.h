// Helpers for the DiT golden tests: fixture loading and the max-abs-error-vs-scale comparison.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdio>
#include <string>

#include "dit/dit.h"
#include "weights/weights.h"
#include "model.h"
#include "../golden.h"

namespace liveavatar::dit::test {

inline std::string fixture_dir() { return DIT_FIXTURES_DIR; }
inline std::string fixture(const std::string& name) { return fixture_dir() + "/" + name; }
inline bool have_fixture(const std::string& name) {
  struct stat st {};
  return ::stat(fixture(name).c_str(), &st) == 0;
}

using golden::close;
using golden::kRelTol;

/// The tiny model of the fixtures with the fixture weights.
inline CausalWanModelS2V load_fixture_model() {
  const auto config = ModelConfig::from_json_file(fixture("config.json"));
  CausalWanModelS2V model(config);
  model->eval();
  weights::load_into_module(*model, weights::load_safetensors(fixture("weights.safetensors")));
  return model;
}

/// A stored RoPE table (re / im fp32 [1, L, c]) as our complex128 [L, 1, c].
inline at::Tensor stored_table(const weights::Checkpoint& ck, const std::string& prefix) {
  const auto re = ck.tensors.at(prefix + "_re").to(at::kDouble)[0];
  const auto im = ck.tensors.at(prefix + "_im").to(at::kDouble)[0];
  return at::complex(re, im).unsqueeze(1);
}

}  // namespace liveavatar::dit::test
