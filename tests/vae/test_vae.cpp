// VAE unit tests: config, checkpoint layout, input errors, causality / streaming identities, loading, NaN reports.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include "vae/vae.h"
#include "weights/weights.h"
#include "modules.h"

namespace liveavatar::vae::test {
namespace {

at::Tensor rand_video(int64_t t, int64_t h, int64_t w, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::rand({1, 3, t, h, w}, gen, at::kFloat) * 2 - 1;
}
at::Tensor rand_latents(int64_t t, int64_t h, int64_t w, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return at::randn({1, 16, t, h, w}, gen, at::kFloat);
}

/// Expects `fn` to throw VaeError whose message contains `needle`.
template <typename Fn>
void expect_vae_error(Fn fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "no VaeError (expected one mentioning '" << needle << "')";
  } catch (const VaeError& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

double rel_err(const at::Tensor& a, const at::Tensor& b) {
  return (a - b).abs().max().item<double>() / std::max(b.abs().max().item<double>(), 1e-12);
}

// ---------------------------------------------------------------------------------------------------------------
// Config and layout
// ---------------------------------------------------------------------------------------------------------------
TEST(VaeConfig, DefaultsAreTheWan21Vae) {
  const VaeConfig c;
  EXPECT_EQ(c.dim, 96);
  EXPECT_EQ(c.z_dim, 16);
  EXPECT_EQ(c.spatial_stride(), 8);
  EXPECT_EQ(c.temporal_stride(), 4);
  EXPECT_NO_THROW(c.validate());
  EXPECT_DOUBLE_EQ(c.latent_mean[7], 1.5508);
  EXPECT_DOUBLE_EQ(c.latent_std[8], 3.2687);
}

// Upstream WanVAE_(dim=96, z_dim=16, ...) has 194 tensors, 126,892,531 parameters (state_dict read on meta).
TEST(VaeConfig, ParameterCountOfTheRealVaeIsTheUpstreamFigure) {
  EXPECT_EQ(VaeConfig{}.parameter_count(), 126892531ull);
}

TEST(VaeConfig, ParameterCountMatchesBuiltModels) {
  auto with_attention = VaeConfig::tiny();
  with_attention.num_res_blocks = 1;
  with_attention.attn_scales = {1.0, 0.5, 0.25};
  EXPECT_EQ(with_attention.parameter_count(), 2675379ull);  // upstream figure for this config
  for (const auto& cfg : {VaeConfig::tiny(), with_attention}) {
    WanVaeModel m(cfg);
    uint64_t n = 0;
    for (const auto& p : m->parameters()) n += static_cast<uint64_t>(p.numel());
    EXPECT_EQ(n, cfg.parameter_count());
  }
}

TEST(VaeConfig, RejectsInconsistentShapes) {
  auto bad = VaeConfig::tiny();
  bad.dim_mult = {1, 2, 4};
  expect_vae_error([&] { bad.validate(); }, "dim_mult");
  bad = VaeConfig::tiny();
  bad.temperal_downsample = {true, true};
  expect_vae_error([&] { bad.validate(); }, "temperal_downsample");
  bad = VaeConfig::tiny();
  bad.z_dim = 8;
  expect_vae_error([&] { bad.validate(); }, "latent_mean");
  bad = VaeConfig::tiny();
  bad.latent_std[3] = 0;
  expect_vae_error([&] { bad.validate(); }, "latent_std");
  bad = VaeConfig::tiny();
  bad.dim = 15;
  expect_vae_error([&] { bad.validate(); }, "dim");
}

// Every key and shape of Wan2.1_VAE.pth (the upstream state_dict of the real config, in wan21_vae_layout.txt).
TEST(VaeLayout, EqualsTheUpstreamStateDict) {
  std::ifstream in(VAE_LAYOUT_FILE);
  ASSERT_TRUE(in) << VAE_LAYOUT_FILE;
  std::map<std::string, std::string> expected;
  for (std::string line; std::getline(in, line);) {
    const auto sp = line.find(' ');
    expected[line.substr(0, sp)] = line.substr(sp + 1);
  }
  ASSERT_EQ(expected.size(), 194u);
  WanVaeModel m{VaeConfig{}};
  const auto layout = weights::module_layout(*m);
  EXPECT_EQ(layout.size(), expected.size());
  for (const auto& [key, spec] : layout) {
    std::ostringstream shape;
    shape << "[";
    for (size_t i = 0; i < spec.shape.size(); ++i) shape << (i ? ", " : "") << spec.shape[i];
    shape << "]";
    const auto it = expected.find(key);
    ASSERT_NE(it, expected.end()) << "unexpected key " << key;
    EXPECT_EQ(shape.str(), it->second) << key;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Input errors
// ---------------------------------------------------------------------------------------------------------------
class TinyVae : public ::testing::Test {
 protected:
  WanVae vae_{VaeConfig::tiny(), c10::kCPU, c10::kFloat, /*seed=*/7};
};

TEST_F(TinyVae, EncodeRejectsImagesSmallerThanOneLatentPixel) {
  expect_vae_error([&] { vae_.encode(rand_video(1, 4, 16, 1)); }, "smaller than one latent pixel");
}

TEST_F(TinyVae, EncodeRejectsSizesThatAreNotMultiplesOf8) {
  expect_vae_error([&] { vae_.encode(rand_video(1, 16, 20, 1)); }, "multiples of 8");
  expect_vae_error([&] { vae_.encode(rand_video(1, 16, 20, 1)); }, "16x16");  // the size to crop to
}

TEST_F(TinyVae, EncodeRejectsFrameCountsThatAreNot1Plus4k) {
  expect_vae_error([&] { vae_.encode(rand_video(3, 16, 16, 1)); }, "1 + 4k frames");
  expect_vae_error([&] { vae_.encode_two_chunks(rand_video(6, 16, 16, 1)); }, "trim it to 5");
}

TEST_F(TinyVae, RejectsWrongChannelCounts) {
  expect_vae_error([&] { vae_.encode(at::zeros({1, 4, 1, 16, 16})); }, "[B, 3, T, H, W]");
  expect_vae_error([&] { vae_.decode(at::zeros({1, 8, 1, 2, 2})); }, "[B, 16,");
  StreamingDecoder d(vae_);
  expect_vae_error([&] { d.decode_block(at::zeros({16, 3, 2, 2})); }, "[B, 16,");
}

TEST_F(TinyVae, StreamRejectsASizeChangeAndRecoversAfterReset) {
  StreamingDecoder d(vae_);
  d.decode_block(rand_latents(3, 2, 3, 1));
  expect_vae_error([&] { d.decode_block(rand_latents(3, 2, 2, 1)); }, "reset()");
  d.reset();
  EXPECT_EQ(d.decode_block(rand_latents(3, 2, 2, 1)).sizes(), at::IntArrayRef({1, 3, 9, 16, 16}));
}

TEST_F(TinyVae, NaNIsReportedWithTheBlockIndex) {
  StreamingDecoder d(vae_);
  d.prime(rand_latents(7, 2, 2, 1));
  d.decode_block(rand_latents(3, 2, 2, 2));
  auto bad = rand_latents(3, 2, 2, 3);
  bad[0][5][1][0][1] = std::nan("");
  expect_vae_error([&] { d.decode_block(bad); }, "block 1");
  EXPECT_EQ(d.frames_seen(), 0);  // the poisoned caches were dropped: the next block starts a new stream
  expect_vae_error([&] { vae_.decode(bad); }, "latent frame 1");
  auto bad_video = rand_video(5, 16, 16, 4);
  bad_video[0][1][3][2][2] = std::nan("");
  expect_vae_error([&] { vae_.encode(bad_video); }, "latent frame 1");
}

// ---------------------------------------------------------------------------------------------------------------
// Shapes, causality and the streaming identities
// ---------------------------------------------------------------------------------------------------------------
TEST_F(TinyVae, ShapesFollowTheStrides) {
  const auto z = vae_.encode(rand_video(9, 16, 24, 1));
  EXPECT_EQ(z.sizes(), at::IntArrayRef({1, 16, 3, 2, 3}));
  const auto x = vae_.decode(z);
  EXPECT_EQ(x.sizes(), at::IntArrayRef({1, 3, 9, 16, 24}));
  EXPECT_LE(x.abs().max().item<double>(), 1.0);
  EXPECT_EQ(vae_.encode(rand_video(1, 8, 8, 1)).sizes(), at::IntArrayRef({1, 16, 1, 1, 1}));
}

TEST_F(TinyVae, EncodeIsCausal) {
  // Latent k depends on frames up to 4k only: a prefix of the video encodes to a prefix of the latents.
  const auto video = rand_video(13, 16, 16, 5);
  const auto full = vae_.encode(video);
  const auto prefix = vae_.encode(video.slice(2, 0, 5));
  EXPECT_LT(rel_err(prefix, full.slice(2, 0, 2)), 1e-6);  // the last 1x1x1 conv may round differently per length
}

TEST_F(TinyVae, BothEncodeChunkingsAgree) {
  // Upstream's encode (1, 4, 4, ..) and stream_encode (1, rest) chunkings compute the same causal function.
  const auto video = rand_video(13, 16, 16, 6);
  EXPECT_LT(rel_err(vae_.encode_two_chunks(video), vae_.encode(video)), 1e-5);
}

TEST_F(TinyVae, StreamingDecodeEqualsFullDecode) {
  // TPP: prime with 7 motion latents, then blocks of 3: exactly the tail of one full decode.
  const auto z = rand_latents(16, 2, 3, 7);
  const auto full = vae_.decode(z);  // 1 + 4 * 15 = 61 frames; the prime covers 1 + 4 * 6 = 25
  StreamingDecoder d(vae_);
  d.prime(z.slice(2, 0, 7));
  for (int64_t b = 0; b < 3; ++b) {
    const auto block = d.decode_block(z.slice(2, 7 + 3 * b, 10 + 3 * b));
    ASSERT_EQ(block.sizes(), at::IntArrayRef({1, 3, 12, 16, 24}));
    EXPECT_TRUE(at::equal(block, full.slice(2, 25 + 12 * b, 37 + 12 * b))) << "block " << b;
  }
  EXPECT_EQ(d.blocks_decoded(), 3);
  EXPECT_EQ(d.frames_seen(), 16);
}

TEST_F(TinyVae, ResetStartsANewStream) {
  const auto z = rand_latents(3, 2, 2, 8);
  StreamingDecoder fresh(vae_);
  const auto first = fresh.decode_block(z);
  EXPECT_EQ(first.size(2), 9);  // unprimed: the stream's first latent frame gives one video frame
  StreamingDecoder used(vae_);
  used.prime(rand_latents(7, 2, 2, 9));
  EXPECT_EQ(used.decode_block(z).size(2), 12);
  used.reset();
  EXPECT_EQ(used.blocks_decoded(), 0);
  EXPECT_TRUE(at::equal(used.decode_block(z), first));
}

TEST_F(TinyVae, DecodersOfOneModelAreIndependent) {
  const auto a = rand_latents(6, 2, 2, 10), b = rand_latents(6, 2, 2, 11);
  StreamingDecoder da(vae_), db(vae_);
  const auto a0 = da.decode_block(a.slice(2, 0, 3));
  const auto b0 = db.decode_block(b.slice(2, 0, 3));
  const auto a1 = da.decode_block(a.slice(2, 3, 6));
  const auto b1 = db.decode_block(b.slice(2, 3, 6));
  EXPECT_TRUE(at::equal(at::cat({a0, a1}, 2), vae_.decode(a)));
  EXPECT_TRUE(at::equal(at::cat({b0, b1}, 2), vae_.decode(b)));
}

// ---------------------------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------------------------
std::map<std::string, at::Tensor> state_of(const WanVae& vae) {
  std::map<std::string, at::Tensor> out;
  for (const auto& p : vae.module()->named_parameters()) out[p.key()] = p.value().detach().clone();
  return out;
}

TEST_F(TinyVae, LoadsSafetensorsAndPthStrictly) {
  const auto state = state_of(vae_);
  const std::string dir = ::testing::TempDir();
  const std::string st = dir + "/vae_test_" + std::to_string(::getpid()) + ".safetensors";
  const std::string pth = dir + "/vae_test_" + std::to_string(::getpid()) + ".pth";
  weights::save_safetensors(st, state);
  weights::save_pth(pth, state);
  const auto z = rand_latents(2, 2, 2, 12);
  const auto expected = vae_.decode(z);
  for (const auto& file : {st, pth}) {
    WanVae other(VaeConfig::tiny(), c10::kCPU, c10::kFloat, /*seed=*/99);
    EXPECT_FALSE(at::equal(other.decode(z), expected));
    other.load_file(file);
    EXPECT_TRUE(at::equal(other.decode(z), expected)) << file;
  }
  // A missing key is an error that names it, and leaves the model as it was.
  auto partial = weights::load_safetensors(st);
  partial.tensors.erase("decoder.upsamples.3.time_conv.bias");
  WanVae other(VaeConfig::tiny(), c10::kCPU, c10::kFloat, /*seed=*/99);
  const auto before = other.decode(z);
  try {
    other.load(partial);
    ADD_FAILURE() << "a missing key was accepted";
  } catch (const weights::WeightsError& e) {
    EXPECT_NE(std::string(e.what()).find("decoder.upsamples.3.time_conv.bias"), std::string::npos) << e.what();
  }
  EXPECT_TRUE(at::equal(other.decode(z), before));
  std::remove(st.c_str());
  std::remove(pth.c_str());
}

TEST(VaePrecision, Bf16StaysCloseToFloat32) {
  WanVae f32(VaeConfig::tiny(), c10::kCPU, c10::kFloat, 3);
  WanVae bf16(VaeConfig::tiny(), c10::kCPU, c10::kBFloat16, 3);
  const auto video = rand_video(5, 16, 16, 13);
  const auto z32 = f32.encode(video), z16 = bf16.encode(video);
  EXPECT_EQ(z16.scalar_type(), at::kFloat);
  EXPECT_LT(rel_err(z16, z32), 0.1);
  EXPECT_LT(rel_err(bf16.decode(z32), f32.decode(z32)), 0.1);
}

}  // namespace
}  // namespace liveavatar::vae::test
