// Test seams of the neural backend (not an API): the end-to-end golden test replaces the two inputs that upstream
// draws outside the model (the RoPE offsets of Python's `random`) or computes differently by design (the whole-file
// audio features, where the backend streams), so the rest of the product path can be compared with the recorded
// upstream run. SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <memory>
#include <vector>

namespace liveavatar::neural {

struct TestSeams {
  /// [audio_layers, audio_dim, frames]: the features of frames 0.. in place of the streaming audio encoder's
  /// (frames past the end are silent, zeros). Undefined: the encoder runs.
  at::Tensor audio_features;
  /// One offset per DiT call, block-major then step (dit::SessionOptions::rope_offsets). Empty: drawn.
  std::vector<int64_t> rope_offsets;
};

/// Seams for the backends created after this call (nullptr: none). Tests only; not thread-safe with creation.
void set_test_seams(std::shared_ptr<const TestSeams> seams);

}  // namespace liveavatar::neural
