// MouthTracker: loudness and spectral shape.
#include <gtest/gtest.h>

#include <cmath>

#include "../../engine/src/puppet/audio_features.h"
#include "test_util.h"

using liveavatar::puppet::MouthTracker;

TEST(Fft, MatchesADirectDft) {
  std::vector<std::complex<float>> a(64);
  for (int i = 0; i < 64; ++i) a[i] = {std::sin(0.3f * i) + 0.1f * i, 0.f};
  auto ref = a;
  liveavatar::puppet::fft_radix2(a);
  for (int k = 0; k < 64; ++k) {
    std::complex<double> s = 0;
    for (int n = 0; n < 64; ++n) s += std::complex<double>(ref[n]) * std::polar(1.0, -2 * M_PI * k * n / 64);
    EXPECT_NEAR(a[k].real(), s.real(), 1e-3);
    EXPECT_NEAR(a[k].imag(), s.imag(), 1e-3);
  }
}

TEST(MouthTracker, LouderOpensWider) {
  auto run = [](float amp) {
    MouthTracker t(16000, 640);
    auto v = testutil::vowel(640 * 20, amp);
    float open = 0;
    for (int f = 0; f < 20; ++f) open = t.push_frame(v.data() + f * 640).open;
    return open;
  };
  const float quiet = run(0.01f), loud = run(0.3f);
  EXPECT_GT(loud, 0.5f);
  EXPECT_LT(quiet, loud);
}

TEST(MouthTracker, SibilantsOpenLessThanVowels) {
  // White noise high-passed (an "s") vs a vowel at the same loudness.
  std::vector<float> hiss(640 * 20);
  uint32_t x = 1;
  float prev = 0;
  for (auto& s : hiss) {
    x = x * 1664525u + 1013904223u;
    const float n = (static_cast<float>(x >> 8) / 16777216.f - 0.5f);
    s = 0.6f * (n - prev);
    prev = n;
  }
  auto vowel = testutil::vowel(640 * 20, 0.3f);
  auto rms = [](const std::vector<float>& v) {
    double s = 0;
    for (float f : v) s += f * f;
    return std::sqrt(s / v.size());
  };
  const double scale = rms(vowel) / rms(hiss);
  for (auto& s : hiss) s *= static_cast<float>(scale);
  MouthTracker a(16000, 640), b(16000, 640);
  liveavatar::puppet::MouthShape sa, sb;
  for (int f = 0; f < 20; ++f) {
    sa = a.push_frame(vowel.data() + f * 640);
    sb = b.push_frame(hiss.data() + f * 640);
  }
  EXPECT_GT(sa.open, sb.open + 0.2f);
  EXPECT_GT(sb.wide, sa.wide);
}

TEST(MouthTracker, ClosesWithinHalfASecondOfSilence) {
  MouthTracker t(16000, 640);
  auto v = testutil::vowel(640 * 10, 0.3f);
  for (int f = 0; f < 10; ++f) t.push_frame(v.data() + f * 640);
  std::vector<float> zeros(640, 0.f);
  float open = 1;
  for (int f = 0; f < 12; ++f) open = t.push_frame(zeros.data()).open;
  EXPECT_LT(open, 0.01f);
}
