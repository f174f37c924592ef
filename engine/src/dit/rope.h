// S2V 3-D rotary position embedding: token positions from grid segments, fp16-rounded tables, application.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "dit/dit.h"  // RopeSegment, RopeTable

namespace liveavatar::dit {

/// Tokens covered by a segment.
int64_t segment_tokens(const RopeSegment& s);

/// Token positions [L, 3] int64 (signed temporal, h, w), segments concatenated in order, tokens f-major.
/// `rollout` is added to the temporal start and end of segments with rolls = true.
at::Tensor rope_positions(const std::vector<RopeSegment>& segments, int64_t rollout = 0);

/// Rotation table [L, 1, D / 2] complex128 for positions [L, 3]; each cos / sin is rounded to fp16 as upstream's
/// complex32 table. Channel split: D/2 - 2 * (D/2 / 3) temporal, D/2 / 3 height, D/2 / 3 width, theta 10000.
at::Tensor rope_table(const at::Tensor& positions, int64_t head_dim);

/// The complex table as cos / sin fp32 (exact: the values are fp16).
RopeTable rope_real(const at::Tensor& table);

/// x [B, L, H, D] (pairs (2i, 2i + 1) = re, im) rotated by the table in fp32 -> fp32. Upstream multiplies in
/// complex128 and rounds to fp32; the fp32 products here round each term (a few ulp apart at most).
at::Tensor rope_apply(const at::Tensor& x, const RopeTable& table);
/// The same with a complex128 table [L, 1, D / 2] (as rope_table returns).
at::Tensor rope_apply(const at::Tensor& x, const at::Tensor& table);

}  // namespace liveavatar::dit
