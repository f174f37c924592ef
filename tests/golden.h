// The comparison every golden test (C++ against upstream fixtures) uses.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <string>

namespace liveavatar::golden {

/// Tolerance of the golden tests: max |ours - ref| <= kRelTol * max |ref|.
constexpr double kRelTol = 1e-4;

/// max |ours - ref| <= rel * max |ref|; prints "[golden] what: max abs err E, scale S, E/S" (and "bit-exact").
inline ::testing::AssertionResult close(const at::Tensor& ours, const at::Tensor& ref, const std::string& what,
                                        double rel = kRelTol) {
  if (ours.sizes() != ref.sizes())
    return ::testing::AssertionFailure() << what << ": shape " << ours.sizes() << " vs reference " << ref.sizes();
  const auto o = ours.to(at::kDouble), r = ref.to(at::kDouble);
  const double err = (o - r).abs().max().item<double>();
  const double scale = r.abs().max().item<double>();
  std::printf("[golden] %-40s max abs err %.3e  scale %.3e  err/scale %.2e%s\n", what.c_str(), err, scale,
              scale > 0 ? err / scale : err, err == 0 ? "  (bit-exact)" : "");
  if (err <= rel * std::max(scale, 1e-12)) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": max abs err " << err << " > " << rel << " x scale " << scale;
}

}  // namespace liveavatar::golden
