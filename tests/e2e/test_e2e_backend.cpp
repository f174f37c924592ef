// End-to-end golden test through the product path: the Engine API with backend=liveavatar, on a model folder in the
// published layout made of the fixture models, against the same recorded upstream run as test_e2e_golden.cpp
// (tests/fixtures/e2e). Two inputs come through the backend's test seams (neural/test_seams.h) because upstream
// makes them outside the model or differently by design: the RoPE offsets (Python's random.randint draws, recorded)
// and the audio features (upstream encodes the whole file; the backend streams, which docs/encoders.md compares).
// Everything else is the backend's own: portrait fit and pixels, VAE conditioning, prompt encoding and cache,
// seeded noise, the DiT session with its sink refresh, the primed streaming decoder and the uint8 frames.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <stdlib.h>

#include <ATen/ATen.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "liveavatar/engine.h"
#include "neural/test_seams.h"
#include "weights/weights.h"
#include "e2e_fixtures.h"

namespace liveavatar::e2e::test {
namespace {

// Upstream's real-time pipeline drops the first 3 decoded frames of the stream; the backend keeps them (frame n
// shows the audio of frame n), so upstream frame n is the backend's frame n + 3.
constexpr int64_t kDroppedFrames = 3;

// A model folder in the published layout (Wan2.2-S2V-14B/...) whose files are links to the fixture models.
struct FixtureModelDir {
  std::string dir;
  FixtureModelDir() {
    char tmpl[] = "/tmp/liveavatar-e2e-XXXXXX";
    dir = mkdtemp(tmpl);
    const std::string base = dir + "/Wan2.2-S2V-14B";
    const std::string cmd = "mkdir -p '" + base + "/google' && cd '" + base + "' && ln -s '" +
                            fixture("dit/config.json") + "' config.json && ln -s '" +
                            fixture("dit/weights.safetensors") + "' diffusion_pytorch_model.safetensors && ln -s '" +
                            fixture("vae/Wan2.1_VAE.pth") + "' Wan2.1_VAE.pth && ln -s '" +
                            fixture("t5/models_t5_umt5-xxl-enc-bf16.pth") + "' models_t5_umt5-xxl-enc-bf16.pth && ln -s '" +
                            fixture("t5/google/umt5-xxl") + "' google/umt5-xxl && ln -s '" +
                            fixture("wav2vec2/wav2vec2-large-xlsr-53-english") + "' wav2vec2-large-xlsr-53-english";
    if (std::system(cmd.c_str()) != 0) ADD_FAILURE() << "cannot lay out the fixture models in " << dir;
    setenv("XDG_CACHE_HOME", (dir + "/cache").c_str(), 1);  // the prompt cache of this test, not the user's
  }
  ~FixtureModelDir() { (void)std::system(("rm -rf '" + dir + "'").c_str()); }
};

TEST(E2eBackend, FramesThroughTheEngineMatchUpstream) {
  if (!have_e2e_fixtures())
    GTEST_SKIP() << "no e2e / component fixtures under " << kFixtures;
  const auto golden = weights::load_safetensors(fixture("e2e/e2e.safetensors"));
  const auto& g = golden.tensors;
  const auto audio = weights::load_safetensors(fixture("wav2vec2/audio_features.safetensors"));
  const at::Tensor features = audio.tensors.at("audio_emb")[0].contiguous();  // [25, 32, 96]: 2 clips of 48
  const at::Tensor waveform = audio.tensors.at("waveform").reshape({-1}).to(at::kFloat).contiguous();
  nlohmann::json prompts;
  std::ifstream(fixture("t5/prompts.json")) >> prompts;

  auto seams = std::make_shared<neural::TestSeams>();
  seams->audio_features = features;
  const auto offsets = g.at("rope_rel_dist").reshape({-1}).contiguous();
  seams->rope_offsets.assign(offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>() + offsets.numel());
  neural::set_test_seams(seams);

  FixtureModelDir models;
  ASSERT_TRUE(register_neural_backend());
  EngineConfig c;
  c.backend = "liveavatar";
  c.model_dir = models.dir;
  c.prompt = prompts["prompts"][0]["raw"].get<std::string>();
  c.width = c.height = 64;
  c.seed = 420;  // upstream's noise seed: clip r draws from a CPU generator seeded 420 + r
  c.precision = "fp32";
  c.worker = "thread";
  auto engine = Engine::create(c);
  neural::set_test_seams(nullptr);

  const at::Tensor ref = g.at("ref_uint8_hwc").contiguous();  // [64, 64, 3]
  engine->set_reference({ref.data_ptr<uint8_t>(), 64, 64, 64 * 3, PixelFormat::kRGB8});
  // As many frames of audio as the recorded run has features (96 = 2 clips): the 2 s waveform, then silence.
  const int64_t frames = features.size(2), spf = 640;
  std::vector<float> samples(static_cast<size_t>(frames * spf), 0.0f);
  std::copy(waveform.data_ptr<float>(), waveform.data_ptr<float>() + std::min<int64_t>(waveform.numel(), frames * spf),
            samples.begin());
  for (size_t at = 0; at < samples.size(); at += 3200)  // 0.2 s pushes, as a live source would
    engine->push_audio(samples.data() + at, std::min<size_t>(3200, samples.size() - at));
  engine->finish();
  std::vector<Frame> out;
  Frame f;
  while (engine->pop_frame(&f)) out.push_back(f);

  const auto& ref_frames = g.at("frames_uint8");  // [93, 64, 64, 3]
  ASSERT_EQ(static_cast<int64_t>(out.size()), frames) << "one frame per 40 ms of audio";
  ASSERT_EQ(static_cast<int64_t>(out.size()) - kDroppedFrames, ref_frames.size(0));
  int64_t differing = 0, max_diff = 0;
  for (int64_t n = 0; n < ref_frames.size(0); ++n) {
    const Frame& ours = out[static_cast<size_t>(n + kDroppedFrames)];
    ASSERT_EQ(ours.index, n + kDroppedFrames);
    ASSERT_EQ(ours.width, 64);
    ASSERT_EQ(ours.height, 64);
    const auto theirs = ref_frames[n].contiguous();
    const uint8_t* p = theirs.data_ptr<uint8_t>();
    for (size_t i = 0; i < ours.rgb.size(); ++i) {
      const int64_t d = std::abs(static_cast<int64_t>(ours.rgb[i]) - static_cast<int64_t>(p[i]));
      differing += d != 0;
      max_diff = std::max(max_diff, d);
    }
  }
  std::printf("[golden] backend frames 3..%lld vs upstream frames_uint8 [93, 64, 64, 3]: %lld of %lld values differ, "
              "max |diff| %lld\n",
              static_cast<long long>(frames - 1), static_cast<long long>(differing),
              static_cast<long long>(ref_frames.numel()), static_cast<long long>(max_diff));
  EXPECT_LE(max_diff, 1);
  EXPECT_LE(differing, ref_frames.numel() / 1000) << "truncation boundaries only";
}

}  // namespace
}  // namespace liveavatar::e2e::test
