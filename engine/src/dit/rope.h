// S2V 3-D rotary position embedding: token positions from grid segments, fp16-rounded tables, application.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace liveavatar::dit {

/// One grid group of upstream's rope_precompute: start (f0, h0, w0), end (f1, h1, w1) and the range (tf, th, tw)
/// that the (f1 - f0) x (h1 - h0) x (w1 - w0) tokens are spread over (np.linspace, truncated). A negative start frame
/// means negative temporal positions (motion frames, upstream: conjugated table rows).
struct RopeSegment {
  int64_t f0 = 0, h0 = 0, w0 = 0;
  int64_t f1 = 0, h1 = 0, w1 = 0;
  int64_t tf = 0, th = 0, tw = 0;
  /// upstream rollout_grid_sizes shifts only the first two groups (noisy, reference), never the motion ones.
  bool rolls = false;
};

/// Tokens covered by a segment.
int64_t segment_tokens(const RopeSegment& s);

/// Token positions [L, 3] int64 (signed temporal, h, w), segments concatenated in order, tokens f-major.
/// `rollout` is added to the temporal start and end of segments with rolls = true.
at::Tensor rope_positions(const std::vector<RopeSegment>& segments, int64_t rollout = 0);

/// Rotation table [L, 1, D / 2] complex128 for positions [L, 3]; each cos / sin is rounded to fp16 as upstream's
/// complex32 table. Channel split: D/2 - 2 * (D/2 / 3) temporal, D/2 / 3 height, D/2 / 3 width, theta 10000.
at::Tensor rope_table(const at::Tensor& positions, int64_t head_dim);

/// x [B, L, H, D] rotated by table [L, 1, D / 2] in fp64 -> fp32 (upstream: complex128 product, .float()).
at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& table);

}  // namespace liveavatar::dit
