// End-to-end golden test: portrait + 2 s of speech -> 93 frames through our VAE, umT5, wav2vec2 and DiT, composed
// as upstream's real-time (TPP) pipeline composes them (causal_s2v_pipeline_tpp.py WanS2V.generate), against the
// upstream run recorded in tests/fixtures/e2e (FIXTURES.md). The fixture models are those of the component fixtures
// (tests/fixtures/{dit,vae,wav2vec2,t5}); docs/e2e.md maps each step to its upstream call and states the figures.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "audio/audio_encoder.h"
#include "dit/dit.h"
#include "text/text_encoder.h"
#include "vae/vae.h"
#include "weights/weights.h"
#include "e2e_fixtures.h"
#include "../golden.h"

namespace liveavatar::e2e::test {
namespace {

// The pipeline settings of the run (FIXTURES.md): 48 video frames per clip, 4 blocks of 3 latent frames per clip,
// noise seed 420 + clip, the first 3 decoded frames dropped, the VAE primed with 7 motion latents.
constexpr int64_t kMotionFrames = 73;
constexpr int64_t kNoiseSeed = 420;
constexpr int64_t kDroppedFrames = 3;
constexpr int64_t kPrimeLatents = 7;
constexpr int64_t kTextLen = 16;

using liveavatar::golden::close;

/// Everything the composed run produced, kept for the per-stage checks.
struct Composed {
  at::Tensor ref_pixels;      // [1, 3, 1, H, W] in [-1, 1]
  at::Tensor ref_latents;     // [1, 16, 1, h, w]
  at::Tensor motion_latents;  // [1, 16, 19, h, w]
  at::Tensor context;         // [text_len, text_dim]
  at::Tensor audio;           // [25, audio_dim, frames]
  int64_t num_clips = 0;
  std::vector<at::Tensor> blocks;  // [16, 3, h, w] final latents per block
  std::vector<int64_t> rope_offsets;
  at::Tensor video;   // [3, N, H, W] in [-1, 1]
  at::Tensor frames;  // [N, H, W, 3] uint8
};

/// The composition under test. Each step names the upstream call it mirrors (TPP WanS2V.generate).
Composed compose(const weights::Checkpoint& golden) {
  at::NoGradGuard no_grad;
  const auto& g = golden.tensors;
  Composed run;

  // Portrait: ToTensor() * 2 - 1 on the uint8 HWC image -> [1, 3, 1, H, W].
  run.ref_pixels = (g.at("ref_uint8_hwc").permute({2, 0, 1}).to(at::kFloat).div(255) * 2 - 1.0)
                       .unsqueeze(1).unsqueeze(0).contiguous();

  // VAE: ref_latents = vae.encode(ref) (TPP: the reference alone), motion_latents = vae.encode(ref x 73).
  const auto vae_ck = weights::load_pth(fixture("vae/Wan2.1_VAE.pth"));
  vae::WanVae vae(vae::VaeConfig::from_checkpoint(vae_ck));
  vae.load(vae_ck);
  run.ref_latents = vae.encode(run.ref_pixels);
  run.motion_latents = vae.encode(run.ref_pixels.repeat({1, 1, kMotionFrames, 1, 1}));

  // Text: context = T5EncoderModel([prompt])[0] (the DiT pads it to text_len with zeros; here length == text_len).
  nlohmann::json prompts;
  std::ifstream(fixture("t5/prompts.json")) >> prompts;
  const auto prompt = prompts["prompts"][0]["raw"].get<std::string>();
  const text::Tokenizer tokenizer(fixture("t5/google/umt5-xxl"), kTextLen);
  const auto t5 = text::TextEncoder::from_file(fixture("t5/models_t5_umt5-xxl-enc-bf16.pth"), text::T5Config::tiny(),
                                               c10::kCPU, at::kFloat);
  run.context = t5.encode(tokenizer, prompt);

  // Audio: encode_audio = extract_audio_feat (whole file) + get_audio_embed_bucket_fps(fps 25, batch_frames 48).
  const auto w2v = audio::AudioEncoder::from_folder(fixture("wav2vec2/wav2vec2-large-xlsr-53-english"));
  const auto waveform = weights::load_safetensors(fixture("wav2vec2/audio_features.safetensors")).tensors.at("waveform");
  run.audio = w2v.features(waveform, {}, &run.num_clips);  // [25, 32, 48 * num_clips]

  // DiT: the four per-step caches share one sink, prefilled at r == 0 and again at r == 1 with the first generated
  // latent frame as reference (the TPP refresh; motion latents unchanged). Noise and RoPE draws as recorded.
  const auto dit_config = dit::ModelConfig::from_json_file(fixture("dit/config.json"));
  dit::Model model(dit_config);
  model.load(weights::load_safetensors(fixture("dit/weights.safetensors")));
  dit::SessionOptions options;
  options.seed = kNoiseSeed;
  options.roll_sink = true;
  const auto offsets = g.at("rope_rel_dist").reshape({-1}).contiguous();
  options.rope_offsets.assign(offsets.data_ptr<int64_t>(), offsets.data_ptr<int64_t>() + offsets.numel());
  dit::Session session(model, options);
  session.set_condition(run.ref_latents[0], run.motion_latents[0], run.context);
  session.set_refresh_motion(run.motion_latents[0]);  // TPP: the encoded reference motion for every clip

  // VAE rank: stream_decode(motion_latents[:, :, :7]) primes the causal caches (output discarded); each block
  // decodes to 12 frames; block 0 of clip 0 drops its first 3.
  vae::StreamingDecoder decoder(vae);
  decoder.prime(run.motion_latents.slice(2, 0, kPrimeLatents));

  const int64_t fpb = dit_config.frames_per_block;
  const int64_t per_clip = dit_config.clip_frames / fpb;
  const int64_t audio_per_block = dit_config.audio_frames_per_block();
  std::vector<at::Tensor> pieces;
  for (int64_t b = 0; b < run.num_clips * per_clip; ++b) {
    const int64_t r = b / per_clip, bi = b % per_clip;
    const auto noise = g.at("clip" + std::to_string(r) + ".noise").slice(1, bi * fpb, (bi + 1) * fpb);
    const auto audio = run.audio.slice(2, b * audio_per_block, (b + 1) * audio_per_block);
    auto block = session.generate_block(audio, noise);
    run.rope_offsets.insert(run.rope_offsets.end(), block.rope_offsets.begin(), block.rope_offsets.end());
    run.blocks.push_back(block.latents);
    auto image = decoder.decode_block(block.latents.unsqueeze(0));  // [1, 3, 12, H, W]
    image = image.slice(2, image.size(2) - 4 * fpb);
    if (b == 0) image = image.slice(2, kDroppedFrames);
    pieces.push_back(image);
  }
  run.video = at::cat(pieces, 2)[0];  // [3, N, H, W]

  // save_video(normalize=True, value_range=(-1, 1)): clamp, make_grid's (x - low) / (high - low), * 255, uint8
  // (truncating).
  const auto u = ((run.video.clamp(-1, 1).permute({1, 0, 2, 3}) + 1) / 2).clamp(0, 1);  // [N, 3, H, W]
  run.frames = (u * 255).to(at::kByte).permute({0, 2, 3, 1}).contiguous();          // [N, H, W, 3]
  return run;
}

class E2eGolden : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!have_e2e_fixtures()) return;
    golden_ = new weights::Checkpoint(weights::load_safetensors(fixture("e2e/e2e.safetensors")));
    run_ = new Composed(compose(*golden_));
  }
  static void TearDownTestSuite() {
    delete run_;
    delete golden_;
    run_ = nullptr;
    golden_ = nullptr;
  }
  void SetUp() override {
    if (run_ == nullptr) GTEST_SKIP() << "no e2e / component fixtures under " << kFixtures;
  }
  static const at::Tensor& g(const std::string& name) { return golden_->tensors.at(name); }

  static weights::Checkpoint* golden_;
  static Composed* run_;
};
weights::Checkpoint* E2eGolden::golden_ = nullptr;
Composed* E2eGolden::run_ = nullptr;

// Tolerance: max |ours - ref| <= 1e-4 x max |ref|, as the component golden tests, for every stage including the 32
// chained DiT calls and the decoded frames (measured worst: 8.3e-6 on b1.final; FIXTURES.md allows 1e-3 for the
// chain should a port's fp32 summation order differ).
using liveavatar::golden::kRelTol;

TEST_F(E2eGolden, PortraitPixels) { EXPECT_TRUE(close(run_->ref_pixels, g("ref_pixels"), "ref_pixels", 0)); }

TEST_F(E2eGolden, ReferenceAndMotionLatents) {
  EXPECT_TRUE(close(run_->ref_latents, g("ref_latents"), "ref_latents", kRelTol));
  EXPECT_TRUE(close(run_->motion_latents, g("motion_latents"), "motion_latents", kRelTol));
}

TEST_F(E2eGolden, TextContext) {
  // FIXTURES.md: the upstream context is bit-identical to tests/fixtures/t5 p0.context.
  const auto ref = weights::load_safetensors(fixture("t5/t5_io.safetensors")).tensors.at("p0.context");
  EXPECT_TRUE(close(run_->context, ref, "context", kRelTol));
}

TEST_F(E2eGolden, AudioFeaturesAndClipCount) {
  // FIXTURES.md: the upstream audio_emb is bit-identical to tests/fixtures/wav2vec2 audio_emb [1, 25, 32, 96].
  const auto ref = weights::load_safetensors(fixture("wav2vec2/audio_features.safetensors")).tensors.at("audio_emb");
  EXPECT_TRUE(close(run_->audio, ref[0], "audio features", kRelTol));
  EXPECT_EQ(run_->num_clips, g("num_clips").item<int64_t>());
}

TEST_F(E2eGolden, SeededNoiseIsTheRecordedNoise) {
  // The Session's own draw (seed + clip) equals the recorded noise, so the override only pins what it would do.
  for (int64_t r = 0; r < run_->num_clips; ++r) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(kNoiseSeed + r);
    const auto& ref = g("clip" + std::to_string(r) + ".noise");
    EXPECT_TRUE(at::equal(at::randn(ref.sizes(), gen), ref)) << "clip " << r;
  }
}

TEST_F(E2eGolden, ScheduleAndRopeOffsets) {
  const auto s = dit::make_schedule(dit::ModelConfig::from_json_file(fixture("dit/config.json")));
  EXPECT_TRUE(at::equal(s.timesteps, g("timesteps")));
  EXPECT_TRUE(at::equal(s.sigmas, g("sigmas")));
  EXPECT_TRUE(at::equal(at::tensor(run_->rope_offsets, at::kLong), g("rope_rel_dist").reshape({-1})));
}

TEST_F(E2eGolden, BlockLatents) {
  ASSERT_EQ(run_->blocks.size(), 8u);
  for (size_t b = 0; b < run_->blocks.size(); ++b)
    EXPECT_TRUE(close(run_->blocks[b], g("b" + std::to_string(b) + ".final"), "b" + std::to_string(b) + ".final",
                      kRelTol));
}

TEST_F(E2eGolden, SinkRefreshReference) {
  // The TPP refresh at r == 1 takes the first latent frame of block 0 as the new reference.
  EXPECT_TRUE(close(run_->blocks[0].slice(1, 0, 1).unsqueeze(0), g("refresh.ref_latents"), "refresh.ref_latents",
                    kRelTol));
}

TEST_F(E2eGolden, FirstFramesBeforeConversion) {
  EXPECT_TRUE(close(run_->video.slice(1, 0, 3), g("frames_first3_f32"), "frames_first3_f32", kRelTol));
}

TEST_F(E2eGolden, Uint8FramesWithinOne) {
  const auto& ref = g("frames_uint8");
  ASSERT_EQ(run_->frames.sizes(), ref.sizes());  // [93, 64, 64, 3]: 9 + 7 x 12 frames
  const auto diff = (run_->frames.to(at::kInt) - ref.to(at::kInt)).abs();
  const int64_t max_diff = diff.max().item<int64_t>();
  const int64_t differing = diff.ne(0).sum().item<int64_t>();
  std::printf("[golden] frames_uint8 %s: %lld of %lld values differ, max |diff| %lld\n",
              c10::str(ref.sizes()).c_str(), static_cast<long long>(differing),
              static_cast<long long>(ref.numel()), static_cast<long long>(max_diff));
  EXPECT_LE(max_diff, 1);
  // Truncation boundaries only: a handful of values, never a visible fraction.
  EXPECT_LE(differing, ref.numel() / 1000) << differing << " values differ";
}

}  // namespace
}  // namespace liveavatar::e2e::test
