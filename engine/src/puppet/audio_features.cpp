// SPDX-License-Identifier: LGPL-2.1-or-later
#include "audio_features.h"

#include <algorithm>
#include <cmath>

namespace liveavatar::puppet {

namespace {
constexpr float kPi = 3.14159265358979f;
constexpr float kSilenceDb = -50.f;     // below this a frame is silence: the mouth closes
constexpr float kInitialPeakDb = -22.f; // typical speech level before any has been heard
constexpr float kPeakDecayDb = 0.02f;   // per frame (0.5 dB/s): the reference follows a quieter speaker slowly
constexpr float kRangeDb = 28.f;        // loudness range from closed to fully open below the running peak
constexpr float kAttack = 0.6f;         // smoothing per frame when opening
constexpr float kRelease = 0.35f;       // smoothing per frame when closing

float band_energy(const std::vector<std::complex<float>>& bins, int sample_rate, int n, float lo_hz, float hi_hz) {
  const int lo = std::max(1, static_cast<int>(lo_hz * n / sample_rate));
  const int hi = std::min(n / 2, static_cast<int>(hi_hz * n / sample_rate));
  float e = 0.f;
  for (int k = lo; k < hi; ++k) e += std::norm(bins[k]);
  return e;
}
}  // namespace

void fft_radix2(std::vector<std::complex<float>>& a) {
  const size_t n = a.size();
  for (size_t i = 1, j = 0; i < n; ++i) {
    size_t bit = n >> 1;
    for (; j & bit; bit >>= 1) j ^= bit;
    j ^= bit;
    if (i < j) std::swap(a[i], a[j]);
  }
  for (size_t len = 2; len <= n; len <<= 1) {
    const float ang = -2.f * kPi / static_cast<float>(len);
    const std::complex<float> wl(std::cos(ang), std::sin(ang));
    for (size_t i = 0; i < n; i += len) {
      std::complex<float> w(1.f, 0.f);
      for (size_t k = 0; k < len / 2; ++k) {
        const std::complex<float> u = a[i + k], v = a[i + k + len / 2] * w;
        a[i + k] = u + v;
        a[i + k + len / 2] = u - v;
        w *= wl;
      }
    }
  }
}

MouthTracker::MouthTracker(int sample_rate, int samples_per_frame)
    : sample_rate_(sample_rate), spf_(samples_per_frame), peak_db_(kInitialPeakDb) {
  fft_size_ = 1;
  while (fft_size_ < spf_) fft_size_ <<= 1;
  history_.assign(fft_size_, 0.f);
  window_.resize(fft_size_);
  for (int i = 0; i < fft_size_; ++i) window_[i] = 0.5f - 0.5f * std::cos(2.f * kPi * i / (fft_size_ - 1));
  bins_.resize(fft_size_);
}

void MouthTracker::reset() {
  std::fill(history_.begin(), history_.end(), 0.f);
  peak_db_ = kInitialPeakDb;
  open_ = wide_ = level_ = 0.f;
}

MouthShape MouthTracker::push_frame(const float* s) {
  // Slide the analysis window: it ends at this frame's last sample.
  std::copy(history_.begin() + spf_, history_.end(), history_.begin());
  std::copy(s, s + spf_, history_.end() - spf_);

  double sum = 0.0;
  for (int i = 0; i < spf_; ++i) sum += static_cast<double>(s[i]) * s[i];
  const float db = 10.f * std::log10(static_cast<float>(sum / spf_) + 1e-12f);

  for (int i = 0; i < fft_size_; ++i) bins_[i] = {history_[i] * window_[i], 0.f};
  fft_radix2(bins_);
  const float low = band_energy(bins_, sample_rate_, fft_size_, 150.f, 1000.f);   // F1 of open vowels
  const float mid = band_energy(bins_, sample_rate_, fft_size_, 1000.f, 2500.f);  // F2 of front vowels
  const float high = band_energy(bins_, sample_rate_, fft_size_, 2500.f, 7000.f); // fricatives, sibilants
  const float total = low + mid + high + 1e-12f;
  const float voiced = (low + 0.5f * mid) / total;  // ~1 for vowels, ~0 for "s"/"f"
  const float spread = (mid + high) / total;

  float target_open = 0.f, target_wide = 0.f, target_level = 0.f;
  if (db > kSilenceDb) {
    peak_db_ = std::max(db, peak_db_ - kPeakDecayDb);
    const float loud = std::clamp((db - (peak_db_ - kRangeDb)) / kRangeDb, 0.f, 1.f);
    target_open = std::pow(loud, 1.3f) * (0.3f + 0.7f * voiced);
    target_wide = std::clamp(spread * 1.4f, 0.f, 1.f);
    target_level = loud;
  } else {
    peak_db_ = std::max(kInitialPeakDb - 12.f, peak_db_ - kPeakDecayDb);
  }
  open_ += (target_open - open_) * (target_open > open_ ? kAttack : kRelease);
  wide_ += (target_wide - wide_) * 0.4f;
  level_ += (target_level - level_) * 0.15f;
  if (open_ < 1e-3f) open_ = 0.f;
  return {open_, wide_, level_};
}

}  // namespace liveavatar::puppet
