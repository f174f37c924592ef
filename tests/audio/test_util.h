// Helpers for the encoder golden tests: the max-abs-error-vs-scale comparison.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>

namespace liveavatar::test {

/// Tolerance of the golden tests: max |ours - ref| <= kRelTol * max |ref|.
constexpr double kRelTol = 1e-4;

/// Compares and prints "[golden] what: max abs err E, scale S, E/S".
inline ::testing::AssertionResult close(const at::Tensor& ours, const at::Tensor& ref, const std::string& what,
                                        double rel = kRelTol) {
  if (ours.sizes() != ref.sizes())
    return ::testing::AssertionFailure() << what << ": shape " << ours.sizes() << " vs reference " << ref.sizes();
  const auto o = ours.to(at::kDouble), r = ref.to(at::kDouble);
  const double err = (o - r).abs().max().item<double>();
  const double scale = r.abs().max().item<double>();
  std::printf("[golden] %-40s max abs err %.3e  scale %.3e  err/scale %.2e\n", what.c_str(), err, scale,
              scale > 0 ? err / scale : err);
  if (err <= rel * std::max(scale, 1e-12)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": max abs err " << err << " > " << rel << " x scale " << scale;
}

}  // namespace liveavatar::test
