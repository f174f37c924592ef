// Per-frame speech features that drive the puppet's mouth: loudness and spectral shape, smoothed.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <complex>
#include <vector>

namespace liveavatar::puppet {

struct MouthShape {
  float open = 0.f;  // 0 closed .. 1 wide open
  float wide = 0.f;  // 0 rounded ("oo") .. 1 spread ("ee", sibilants)
  float level = 0.f; // loudness relative to the running speech level, 0..1 (drives small head nods)
};

/// Turns each frame of samples into a MouthShape. Causal: a frame's shape depends only on samples up to its end,
/// so chunked and whole-file input give identical results. Deterministic; not thread-safe.
class MouthTracker {
 public:
  MouthTracker(int sample_rate, int samples_per_frame);
  /// Consumes exactly samples_per_frame samples.
  MouthShape push_frame(const float* samples);
  void reset();

 private:
  int sample_rate_;
  int spf_;
  int fft_size_;
  std::vector<float> history_;  // the last fft_size_ samples
  std::vector<float> window_;
  std::vector<std::complex<float>> bins_;
  float peak_db_;       // running speech level (slow decay), the loudness reference
  float open_ = 0.f;    // smoothed outputs
  float wide_ = 0.f;
  float level_ = 0.f;
};

/// In-place radix-2 FFT; size must be a power of two.
void fft_radix2(std::vector<std::complex<float>>& a);

}  // namespace liveavatar::puppet
