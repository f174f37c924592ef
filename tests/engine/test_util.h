// Shared helpers for the engine tests.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "liveavatar/engine.h"
#include "media_io.h"

namespace testutil {

inline std::string asset(const std::string& name) { return std::string(LIVEAVATAR_ASSETS_DIR) + "/" + name; }

inline const liveavatar::io::Image& portrait() {
  static const liveavatar::io::Image img = liveavatar::io::read_png(asset("portrait.png"));
  return img;
}

inline const std::vector<float>& speech() {
  static const std::vector<float> s = [] {
    int rate = 0;
    auto v = liveavatar::io::read_audio(asset("speech.wav"), &rate);
    if (rate != 16000) throw std::runtime_error("speech.wav must be 16 kHz");
    return v;
  }();
  return s;
}

// A vowel-like voiced signal: 140 Hz pulses through resonances near 700 and 1200 Hz.
inline std::vector<float> vowel(size_t n, float amplitude = 0.3f) {
  std::vector<float> s(n);
  for (size_t i = 0; i < n; ++i) {
    const double t = i / 16000.0;
    double v = 0;
    for (int h = 1; h <= 40; ++h) {
      const double f = 140.0 * h;
      const double g = std::exp(-std::pow((f - 700) / 250, 2)) + 0.6 * std::exp(-std::pow((f - 1200) / 300, 2)) + 0.02;
      v += g * std::sin(2 * M_PI * f * t);
    }
    s[i] = static_cast<float>(amplitude * v / 2.0);
  }
  return s;
}

inline liveavatar::EngineConfig config(uint64_t seed = 0, int size = 256) {
  liveavatar::EngineConfig c;
  c.seed = seed;
  c.width = c.height = size;
  return c;
}

// Renders all frames for `audio` pushed in chunks of `chunk` samples.
inline std::vector<liveavatar::Frame> render(liveavatar::Engine& e, const std::vector<float>& audio, size_t chunk) {
  std::vector<liveavatar::Frame> out;
  liveavatar::Frame f;
  for (size_t i = 0; i < audio.size(); i += chunk) {
    e.push_audio(audio.data() + i, std::min(chunk, audio.size() - i));
    while (e.pop_frame(&f)) out.push_back(f);
  }
  e.finish();
  while (e.pop_frame(&f)) out.push_back(f);
  return out;
}

// Mean luma inside r (clipped to the frame).
inline double mean_luma(const liveavatar::Frame& f, const liveavatar::Rect& r) {
  double sum = 0;
  int n = 0;
  for (int y = std::max(0, r.y); y < std::min(f.height, r.y + r.height); ++y)
    for (int x = std::max(0, r.x); x < std::min(f.width, r.x + r.width); ++x, ++n) {
      const uint8_t* p = &f.rgb[(static_cast<size_t>(y) * f.width + x) * 3];
      sum += 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
    }
  return n ? sum / n : 0;
}

}  // namespace testutil
