// SPDX-License-Identifier: LGPL-2.1-or-later
#include "rope.h"

#include <cmath>
#include <string>

#include "dit/dit.h"

namespace liveavatar::dit {
namespace {

// numpy.linspace(start, stop, num).astype(int): float64 arithmetic, the last sample pinned to stop, truncation.
std::vector<int64_t> linspace_int(double start, double stop, int64_t num) {
  std::vector<int64_t> out;
  if (num <= 0) return out;
  const double delta = stop - start;
  const int64_t div = num - 1;
  out.reserve(static_cast<size_t>(num));
  for (int64_t i = 0; i < num; ++i) {
    double y;
    if (div > 0) {
      const double step = delta / static_cast<double>(div);
      y = (step == 0.0) ? static_cast<double>(i) / div * delta : static_cast<double>(i) * step;
    } else {
      y = static_cast<double>(i) * delta;
    }
    y += start;
    if (div > 0 && i == num - 1) y = stop;
    out.push_back(static_cast<int64_t>(y));  // truncation toward zero, as astype(int)
  }
  return out;
}

}  // namespace

int64_t segment_tokens(const RopeSegment& s) {
  const int64_t n = (s.f1 - s.f0) * (s.h1 - s.h0) * (s.w1 - s.w0);
  return n > 0 ? n : 0;
}

at::Tensor rope_positions(const std::vector<RopeSegment>& segments, int64_t rollout) {
  std::vector<int64_t> flat;
  for (const RopeSegment& seg0 : segments) {
    RopeSegment s = seg0;
    if (s.rolls) {
      s.f0 += rollout;
      s.f1 += rollout;
    }
    const int64_t nf = s.f1 - s.f0, nh = s.h1 - s.h0, nw = s.w1 - s.w0;
    if (nf * nh * nw <= 0) continue;
    if (s.tf <= 0) throw DitError("rope: a segment with tokens needs a positive frame range, got " +
                                  std::to_string(s.tf));
    if (s.f0 * s.f1 < 0)
      throw DitError("rope: a segment may not cross temporal index 0 (" + std::to_string(s.f0) + ".." +
                     std::to_string(s.f1) + ")");
    std::vector<int64_t> fs;
    if (s.f0 >= 0) {
      fs = linspace_int(static_cast<double>(s.f0), static_cast<double>(s.tf + s.f0 - 1), nf);
    } else {
      fs = linspace_int(static_cast<double>(-s.f0), static_cast<double>(-s.tf - s.f0 + 1), nf);
      for (auto& f : fs) f = -f;  // conjugated rows = negative positions
    }
    const auto hs = linspace_int(static_cast<double>(s.h0), static_cast<double>(s.th + s.h0 - 1), nh);
    const auto ws = linspace_int(static_cast<double>(s.w0), static_cast<double>(s.tw + s.w0 - 1), nw);
    for (int64_t f : fs)
      for (int64_t h : hs)
        for (int64_t w : ws) {
          flat.push_back(f);
          flat.push_back(h);
          flat.push_back(w);
        }
  }
  const auto n = static_cast<int64_t>(flat.size() / 3);
  return at::tensor(flat, at::kLong).view({n, 3});
}

at::Tensor rope_table(const at::Tensor& positions, int64_t head_dim) {
  const int64_t c = head_dim / 2;
  const int64_t parts[3] = {c - 2 * (c / 3), c / 3, c / 3};
  std::vector<at::Tensor> cols;
  const auto& pos = positions;  // computed where the positions are (the model's device: no host table to copy)
  for (int axis = 0; axis < 3; ++axis) {
    const int64_t dim = 2 * parts[axis];
    // rope_params: 1 / 10000^(arange(0, dim, 2) / dim), angles p * inv_freq, all fp64.
    const auto inv = at::reciprocal(
        at::pow(10000, at::arange(0, dim, 2, at::TensorOptions().dtype(at::kDouble).device(pos.device())).div(dim)));
    const auto p = pos.select(1, axis);
    const auto mag = p.abs().to(at::kDouble);
    const auto angles = at::outer(mag, inv);                  // [L, part]
    auto table = at::polar(at::ones_like(angles), angles);    // complex128
    // complex32 rounding of the table, as rope_precompute stores it.
    // complex128 -> complex32 converts each part double -> float -> half (c10::complex<Half> from complex<float>);
    // done on the real view to avoid the experimental ComplexHalf dtype.
    table = at::view_as_complex(at::view_as_real(table).to(at::kFloat).to(at::kHalf).to(at::kDouble).contiguous());
    const auto negative = p.lt(0).unsqueeze(1);
    table = at::where(negative, table.conj().resolve_conj(), table);
    cols.push_back(table);
  }
  return at::cat(cols, 1).unsqueeze(1);  // [L, 1, c]
}

RopeTable rope_real(const at::Tensor& table) {
  if (!table.is_complex()) throw DitError("rope: expected a complex table [L, 1, D / 2]");
  const auto parts = at::view_as_real(table.resolve_conj());  // [L, 1, D/2, 2]
  return {parts.select(-1, 0).to(at::kFloat).contiguous(), parts.select(-1, 1).to(at::kFloat).contiguous()};
}

at::Tensor rope_apply(const at::Tensor& x, const RopeTable& table) {
  const auto b = x.size(0), l = x.size(1), h = x.size(2), d = x.size(3);
  if (table.cos.size(0) != l || table.cos.size(-1) * 2 != d)
    throw DitError("rope: table for " + std::to_string(table.cos.size(0)) + " tokens x " +
                   std::to_string(table.cos.size(-1) * 2) + " channels, tensor has " + std::to_string(l) + " x " +
                   std::to_string(d));
  // (re + i im)(cos + i sin) in fp32: the table values are fp16, so cos / sin are exact; the fp32 products and sums
  // round where upstream's complex128 product does not.
  const auto xf = x.to(at::kFloat).reshape({b, l, h, d / 2, 2});
  const auto re = xf.select(-1, 0), im = xf.select(-1, 1);  // [B, L, H, D/2]
  const auto& c = table.cos;                                  // [L, 1, D/2] broadcast over B and H
  const auto& s = table.sin;
  return at::stack({re * c - im * s, re * s + im * c}, -1).flatten(3);  // [B, L, H, D]
}

at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& table) { return rope_apply(x, rope_real(table)); }

}  // namespace liveavatar::dit
