// Golden tests of the VAE against the upstream fixtures (tests/fixtures/vae: tiny dim-4 Wan2.1 VAE, fp32, CPU):
// the single-GPU and TPP reference encodes, the motion encode, the TPP streaming decode (prime + 3 blocks) and the
// full decode, with the encoder / decoder intermediates. Tolerance: max |ours - ref| <= 1e-4 x max |ref|.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cstdio>
#include <string>

#include "vae/vae.h"
#include "weights/weights.h"
#include "modules.h"
#include "run_module.h"
#include "../golden.h"

namespace liveavatar::vae::test {
namespace {

std::string fixture(const std::string& name) { return std::string(VAE_FIXTURES_DIR) + "/" + name; }
bool have_fixture(const std::string& name) {
  struct stat st {};
  return ::stat(fixture(name).c_str(), &st) == 0;
}

using liveavatar::golden::close;
// The VAE runs in fp32 only (no bf16 / fp16 rounding): kernels differ per CPU by a few ulp per reduction.
constexpr auto kTol = liveavatar::golden::kFp32;

VaeConfig fixture_config() {
  auto c = VaeConfig::tiny();
  c.dim = 4;  // FIXTURES.md: WanVAE_(dim=4, z_dim=16, everything else as upstream)
  return c;
}

class VaeGolden : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_fixture("vae_io.safetensors") || !have_fixture("Wan2.1_VAE.pth"))
      GTEST_SKIP() << "no VAE fixtures in " << VAE_FIXTURES_DIR;
    vae_.load_file(fixture("Wan2.1_VAE.pth"));
    io_ = weights::load_safetensors(fixture("vae_io.safetensors"));
  }
  const at::Tensor& t(const std::string& name) { return io_.tensors.at(name); }
  at::Tensor ref_repeated(int64_t frames) { return t("ref_pixels").repeat({1, 1, frames, 1, 1}); }

  /// Encoder3d over chunks [bounds[i], bounds[i+1]) and WanVAE_.conv1: the intermediates of an encode.
  std::pair<at::Tensor, at::Tensor> encoder_and_conv1(const at::Tensor& video, const std::vector<int64_t>& bounds) {
    at::NoGradGuard no_grad;
    auto& m = *vae_.module();
    FeatureCache cache;
    std::vector<at::Tensor> outs;
    for (size_t i = 0; i + 1 < bounds.size(); ++i) {
      cache.rewind();
      outs.push_back(m.encoder->forward(video.slice(2, bounds[i], bounds[i + 1]), cache));
    }
    const auto enc = at::cat(outs, 2);
    return {enc, m.conv1->forward(enc)};
  }

  WanVae vae_{fixture_config()};
  weights::Checkpoint io_;
};

TEST_F(VaeGolden, PthAndSafetensorsHoldTheSameWeights) {
  WanVae other(fixture_config(), c10::kCPU, c10::kFloat, /*seed=*/5);
  other.load_file(fixture("Wan2.1_VAE.safetensors"));
  const auto a = vae_.module()->named_parameters(), b = other.module()->named_parameters();
  ASSERT_EQ(a.size(), 194u);
  for (const auto& p : a) EXPECT_TRUE(at::equal(p.value(), b[p.key()])) << p.key();
}

TEST_F(VaeGolden, LatentScaleNumbersAreUpstreams) {
  const auto& c = vae_.config();
  const auto mean = at::tensor(c.latent_mean, at::kDouble).to(at::kFloat);
  const auto stdv = at::tensor(c.latent_std, at::kDouble).to(at::kFloat);
  EXPECT_TRUE(at::equal(mean, t("scale.mean")));
  EXPECT_TRUE(at::equal(stdv, t("scale.std")));
  EXPECT_TRUE(at::equal(1.0 / stdv, t("scale.inv_std")));
}

// Single-GPU pipeline: ref_latents = encode(ref x 5)[:, :, 1:].
TEST_F(VaeGolden, SingleGpuReferenceEncode) {
  const auto video = ref_repeated(5);
  const auto [enc, conv1] = encoder_and_conv1(video, {0, 1, 5});
  EXPECT_TRUE(close(enc, t("enc_ref5.encoder_out"), "enc_ref5 encoder_out", kTol));
  EXPECT_TRUE(close(conv1, t("enc_ref5.conv1_out"), "enc_ref5 conv1_out", kTol));
  const auto z = vae_.encode(video);
  EXPECT_TRUE(close(z, t("enc_ref5.latent_full"), "enc_ref5 latent_full", kTol));
  EXPECT_TRUE(close(z.slice(2, 1), t("enc_ref5.ref_latents"), "enc_ref5 ref_latents", kTol));
  // stream_encode's chunking (1, then the rest) computes the same function.
  EXPECT_TRUE(close(vae_.encode_two_chunks(video), t("enc_ref5.latent_full"), "enc_ref5 (1, rest chunks)", kTol));
}

// TPP pipeline: ref_latents = encode(ref) (one frame).
TEST_F(VaeGolden, TppReferenceEncode) {
  const auto [enc, conv1] = encoder_and_conv1(t("ref_pixels"), {0, 1});
  EXPECT_TRUE(close(enc, t("enc_ref1.encoder_out"), "enc_ref1 encoder_out", kTol));
  EXPECT_TRUE(close(conv1, t("enc_ref1.conv1_out"), "enc_ref1 conv1_out", kTol));
  EXPECT_TRUE(close(vae_.encode(t("ref_pixels")), t("enc_ref1.ref_latents"), "enc_ref1 ref_latents", kTol));
}

// motion_latents = encode(ref x 73): 19 latents, different along time through the causal zero history.
TEST_F(VaeGolden, MotionEncode) {
  EXPECT_TRUE(close(vae_.encode(ref_repeated(73)), t("enc_motion.motion_latents"), "motion_latents (73 -> 19)", kTol));
}

// TPP: stream_decode(motion[:, :, :7]) primes the caches, then blocks 0, 1, 2 give 12 frames each.
TEST_F(VaeGolden, StreamingDecodeOverThreeBlocks) {
  const auto& prime = t("sdec.prime_latents");
  EXPECT_TRUE(at::equal(prime, t("enc_motion.motion_latents").slice(2, 0, 7)));
  StreamingDecoder decoder(vae_);
  decoder.prime(prime);
  for (int b = 0; b < 3; ++b) {
    const std::string p = "sdec.block" + std::to_string(b);
    const auto out = decoder.decode_block(t(p + "_latents"));
    EXPECT_TRUE(close(out, t(p + "_out"), "stream block " + std::to_string(b) + " (12 frames)", kTol));
  }
  EXPECT_EQ(decoder.blocks_decoded(), 3);
}

// The priming call's intermediates and the pre-clamp decoder output of block 0's first latent, step by step.
TEST_F(VaeGolden, StreamingDecoderIntermediates) {
  at::NoGradGuard no_grad;
  auto& m = *vae_.module();
  const auto mean = t("scale.mean").view({1, -1, 1, 1, 1}), inv_std = t("scale.inv_std").view({1, -1, 1, 1, 1});
  const auto x = m.conv2->forward(t("sdec.prime_latents") / inv_std + mean);
  EXPECT_TRUE(close(x, t("sdec.prime_dec_conv2"), "prime conv2", kTol));
  FeatureCache cache;
  std::vector<at::Tensor> frames;
  for (int64_t i = 0; i < x.size(2); ++i) {
    cache.rewind();
    frames.push_back(m.decoder->forward(x.slice(2, i, i + 1), cache));
  }
  const auto primed = at::cat(frames, 2).clamp(-1, 1);
  ASSERT_EQ(primed.size(2), 25);
  EXPECT_TRUE(close(primed.slice(2, 0, 1), t("sdec.prime_out_frame0"), "prime out frame 0", kTol));
  EXPECT_TRUE(close(primed.slice(2, 21), t("sdec.prime_out_last4"), "prime out last 4", kTol));
  const auto z0 = m.conv2->forward(t("sdec.block0_latents") / inv_std + mean);
  cache.rewind();
  const auto raw = m.decoder->forward(z0.slice(2, 0, 1), cache);
  EXPECT_TRUE(close(raw, t("sdec.block0_decoder_raw_first4"), "block0 decoder raw (first latent)", kTol));
}

// Single-GPU style: one decode of [prime ; block0 ; block1 ; block2] = the streamed frames (upstream: bit-identical).
TEST_F(VaeGolden, FullDecode) {
  const auto z = at::cat({t("sdec.prime_latents"), t("sdec.block0_latents"), t("sdec.block1_latents"),
                          t("sdec.block2_latents")},
                         2);
  const auto video = vae_.decode(z);
  ASSERT_EQ(video.sizes(), at::IntArrayRef({1, 3, 61, 32, 64}));
  EXPECT_TRUE(close(video.slice(2, 0, 1), t("sdec.prime_out_frame0"), "full decode frame 0", kTol));
  EXPECT_TRUE(close(video.slice(2, 21, 25), t("sdec.prime_out_last4"), "full decode frames 21-24", kTol));
  for (int b = 0; b < 3; ++b)
    EXPECT_TRUE(close(video.slice(2, 25 + 12 * b, 37 + 12 * b), t("sdec.block" + std::to_string(b) + "_out"),
                      "full decode frames of block " + std::to_string(b), kTol));
}

// liveavatar-run-module's VAE modules on the fixture folder (dim 4 read from the checkpoint).
TEST_F(VaeGolden, RunModuleTool) {
  dit::tool::RunRequest request;
  request.weights = VAE_FIXTURES_DIR;
  request.module = "vae_encode";
  auto out = dit::tool::run(request, {{"video", t("ref_pixels")[0]}});
  EXPECT_TRUE(close(out.at("latents"), t("enc_ref1.ref_latents"), "run-module vae_encode", kTol));
  request.module = "vae_stream_decode";
  out = dit::tool::run(request, {{"prime", t("sdec.prime_latents")},
                                 {"latents", at::cat({t("sdec.block0_latents"), t("sdec.block1_latents")}, 2)}});
  EXPECT_TRUE(close(out.at("video.1"), t("sdec.block1_out"), "run-module vae_stream_decode block 1", kTol));
  EXPECT_EQ(out.at("video").size(2), 24);
}

TEST_F(VaeGolden, StreamCacheSize) {
  // Steady state: one [B, C, 2, h, w] fp32 history per causal conv with a temporal kernel.
  StreamingDecoder decoder(vae_);
  decoder.prime(t("sdec.prime_latents"));
  const auto primed = decoder.cache_bytes();
  decoder.decode_block(t("sdec.block0_latents"));
  EXPECT_EQ(decoder.cache_bytes(), primed);
  std::printf("[cache] dim 4, 32x64 px: %llu bytes\n", static_cast<unsigned long long>(primed));
  EXPECT_GT(primed, 0u);
}

}  // namespace
}  // namespace liveavatar::vae::test
