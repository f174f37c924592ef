// liveavatar-bench: how fast a backend renders, as JSON on stdout.
// Puppet target: >= 20x real time at 512x512 on one core (--threads 1).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <opencv2/core.hpp>
#include <string>
#include <vector>

#include "cli_args.h"
#include "liveavatar/engine.h"
#include "media_io.h"

#ifdef LIVEAVATAR_WITH_DIT
int liveavatar_dit_bench_main(int argc, char** argv);
int liveavatar_model_bench_main(int argc, char** argv);
int liveavatar_parallel_bench_main(int argc, char** argv);
#endif

namespace {

const char kUsage[] =
    "usage: liveavatar-bench --image PORTRAIT.png [--audio SPEECH.wav] [options]\n"
    "  --backend NAME   (default puppet)\n"
    "  --size WxH       output size (default 512x512)\n"
    "  --seconds S      audio seconds to render (default 30; the clip is looped or synthesised)\n"
    "  --threads N      OpenCV worker threads (default 1: one core)\n"
    "  --repeat N       timed runs, the best and median are reported (default 3)\n"
    "liveavatar-bench --dit tiny|14b [...]: the streaming DiT instead (per-block latency, peak memory);\n"
    "  the same options as liveavatar-dit-bench (--device, --dtype, --blocks, --latent, --checkpoint, ...).\n"
    "liveavatar-bench --config tiny|medium|14b --random-weights [...]: the DiT on the devices of a plan (GPUs:\n"
    "  FPS, first block, peak memory vs the planner, TFLOP/s, a PNG); --config --help lists its options.\n"
    "liveavatar-bench --plan single|step|stage [--devices cpu:N] [...]: a parallel plan against single with the\n"
    "  same total cores (blocks/s, time to the first block, pipeline bubble, bytes per hop; --plan --help).\n";

// Without --audio: a voiced signal (150 Hz pulse train through two formants) gated 1.2 s on / 0.5 s off.
std::vector<float> synthetic_speech(size_t n, int rate) {
  std::vector<float> s(n);
  float f1 = 0.f, f2 = 0.f, v1 = 0.f, v2 = 0.f;
  for (size_t i = 0; i < n; ++i) {
    const double t = static_cast<double>(i) / rate;
    const bool on = std::fmod(t, 1.7) < 1.2;
    const float pulse = (i % (rate / 150) == 0) ? 1.f : 0.f;
    // Two resonators (~700 Hz and ~1200 Hz) give a vowel-like spectrum.
    v1 += 0.29f * (pulse - f1) - 0.05f * v1; f1 += v1 * 0.29f;
    v2 += 0.46f * (pulse - f2) - 0.05f * v2; f2 += v2 * 0.46f;
    s[i] = on ? 0.3f * (f1 + 0.5f * f2) : 0.f;
  }
  return s;
}

int run(int argc, char** argv) {
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--config") {
#ifdef LIVEAVATAR_WITH_DIT
      return liveavatar_model_bench_main(argc, argv);
#else
      throw liveavatar::Error("--config needs the engine built with LibTorch: run scripts/setup.sh and rebuild");
#endif
    }
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--dit") {
#ifdef LIVEAVATAR_WITH_DIT
      return liveavatar_dit_bench_main(argc, argv);
#else
      throw liveavatar::Error("--dit needs the engine built with LibTorch: run scripts/setup.sh and rebuild");
#endif
    } else if (std::string(argv[i]) == "--plan") {
#ifdef LIVEAVATAR_WITH_DIT
      return liveavatar_parallel_bench_main(argc, argv);
#else
      throw liveavatar::Error("--plan needs the engine built with LibTorch: run scripts/setup.sh and rebuild");
#endif
    }
  std::string image_path, audio_path;
  liveavatar::EngineConfig config;
  config.width = config.height = 512;
  double seconds = 30;
  int threads = 1, repeat = 3;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw liveavatar::Error(a + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    } else if (a == "--image") {
      image_path = value();
    } else if (a == "--audio") {
      audio_path = value();
    } else if (a == "--backend") {
      config.backend = value();
    } else if (a == "--size") {
      const auto s = liveavatar::cli::parse_size(a, value());
      config.width = s.width;
      config.height = s.height;
    } else if (a == "--seconds") {
      seconds = static_cast<double>(liveavatar::cli::parse_long(a, value(), 1, 3600));
    } else if (a == "--threads") {
      threads = static_cast<int>(liveavatar::cli::parse_long(a, value(), 1, 256));
    } else if (a == "--repeat") {
      repeat = static_cast<int>(liveavatar::cli::parse_long(a, value(), 1, 100));
    } else {
      throw liveavatar::Error("unknown option " + a + "\n" + kUsage);
    }
  }
  if (image_path.empty()) throw liveavatar::Error(std::string("--image is required\n") + kUsage);
  cv::setNumThreads(threads == 1 ? 0 : threads);  // 0 = run OpenCV loops on the calling thread

  const auto image = liveavatar::io::read_png(image_path);
  const size_t n = static_cast<size_t>(seconds * config.sample_rate);
  std::vector<float> audio;
  if (!audio_path.empty()) {
    int rate = 0;
    const auto clip = liveavatar::io::read_audio(audio_path, &rate);
    if (rate != config.sample_rate || clip.empty()) throw liveavatar::Error(audio_path + ": need 16 kHz audio");
    audio.resize(n);
    for (size_t i = 0; i < n; ++i) audio[i] = clip[i % clip.size()];
  } else {
    audio = synthetic_speech(n, config.sample_rate);
  }

  std::vector<double> runs;
  int64_t frames = 0;
  double first_frame_ms = 0;
  for (int r = 0; r < repeat; ++r) {
    auto engine = liveavatar::Engine::create(config);
    engine->set_reference(image.view());
    liveavatar::Frame f;
    frames = 0;
    const auto t0 = std::chrono::steady_clock::now();
    const size_t chunk = 320;  // 20 ms packets, like a live microphone
    for (size_t i = 0; i < audio.size(); i += chunk) {
      engine->push_audio(audio.data() + i, std::min(chunk, audio.size() - i));
      while (engine->pop_frame(&f)) {
        if (frames++ == 0 && r == 0)
          first_frame_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      }
    }
    engine->finish();
    while (engine->pop_frame(&f)) ++frames;
    runs.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(runs.begin(), runs.end());
  const double best = runs.front(), median = runs[runs.size() / 2];
  std::printf(
      "{\"backend\": \"%s\", \"width\": %d, \"height\": %d, \"threads\": %d, \"audio_seconds\": %.2f, "
      "\"frames\": %lld, \"runs\": %d, \"best_s\": %.4f, \"median_s\": %.4f, \"ms_per_frame\": %.3f, "
      "\"fps\": %.1f, \"realtime_factor\": %.1f, \"first_frame_ms\": %.2f}\n",
      config.backend.c_str(), config.width, config.height, threads, seconds, static_cast<long long>(frames), repeat,
      best, median, 1000.0 * median / frames, frames / median, seconds / median, first_frame_ms);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "liveavatar-bench: %s\n", e.what());
    return 1;
  }
}
