// Golden tests of the whole model against upstream: sink prefill + one wrapped-ring inference call with its
// intermediates (model_forward), the audio path (audio_path), and the streaming loop with and without the rolling
// sink (streaming, streaming_refresh). The model-level runs go through liveavatar-run-module's library.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/CPUGeneratorImpl.h>

#include "golden_util.h"
#include "run_module.h"

namespace liveavatar::dit::test {
namespace {

using tool::TensorMap;

const at::Tensor& at_key(const weights::Checkpoint& ck, const std::string& k) {
  const auto it = ck.tensors.find(k);
  if (it == ck.tensors.end()) throw std::runtime_error("fixture has no tensor " + k);
  return it->second;
}

tool::RunRequest fixture_request(const std::string& module) {
  tool::RunRequest r;
  r.module = module;
  r.weights = fixture_dir();  // weights.safetensors + config.json (constructor_args)
  return r;
}

class ModelGolden : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_fixture("model_forward.safetensors")) GTEST_SKIP() << "no model_forward.safetensors fixture";
    ck_ = weights::load_safetensors(fixture("model_forward.safetensors"));
  }
  const at::Tensor& t(const std::string& k) { return at_key(ck_, k); }
  TensorMap inputs() {
    TensorMap in{{"ref_latents", t("in.ref_latents")},   {"motion_latents", t("in.motion_latents")},
                 {"context", t("in.context")},           {"x", t("in.noisy_latent")},
                 {"t", t("in.t")},                        {"audio", t("in.audio_input")},
                 {"cond_states", t("in.cond_states")},   {"current_start", t("in.current_start")},
                 {"rope_offset", t("inf.rope_rel_dist")}};
    for (int l = 0; l < 2; ++l) {
      in["kv_k." + std::to_string(l)] = t("in.ring.layer" + std::to_string(l) + ".k");
      in["kv_v." + std::to_string(l)] = t("in.ring.layer" + std::to_string(l) + ".v");
    }
    return in;
  }
  weights::Checkpoint ck_;
};

TEST_F(ModelGolden, SinkPrefillCondCacheMatchesUpstream) {
  const auto out = tool::run(fixture_request("sink"), inputs());
  for (int l = 0; l < 2; ++l) {
    const auto L = std::to_string(l);
    EXPECT_TRUE(close(out.at("cond_k." + L), t("sink.layer" + L + ".cond_k"), "sink layer" + L + " cond_k"));
    EXPECT_TRUE(close(out.at("cond_v." + L), t("sink.layer" + L + ".cond_v"), "sink layer" + L + " cond_v"));
  }
}

TEST_F(ModelGolden, InferenceVelocityAndRingMatchUpstream) {
  const auto out = tool::run(fixture_request("block"), inputs());
  EXPECT_TRUE(close(out.at("noise_pred"), t("out.velocity"), "model velocity (wrapped ring, offset 7)"));
  for (int l = 0; l < 2; ++l) {
    const auto L = std::to_string(l);
    EXPECT_TRUE(close(out.at("kv_k." + L).slice(1, 96, 192), t("inf.ring_written.layer" + L + ".k"),
                      "ring layer" + L + " k written"));
    EXPECT_TRUE(close(out.at("kv_v." + L).slice(1, 96, 192), t("inf.ring_written.layer" + L + ".v"),
                      "ring layer" + L + " v written"));
    // Rows outside the written block are left as they were.
    EXPECT_TRUE(at::equal(out.at("kv_k." + L).slice(1, 192), t("in.ring.layer" + L + ".k").slice(1, 192)));
  }
}

TEST_F(ModelGolden, EmbeddingsAndIntermediatesMatchUpstream) {
  at::NoGradGuard no_grad;
  auto model = load_fixture_model();
  EXPECT_TRUE(close(model->embed_text(t("in.context")), t("inf.text_embedding"), "text_embedding"));
  auto [e, e0] = model->embed_time(t("in.t").reshape({-1}));
  EXPECT_TRUE(close(e, t("inf.time_embedding").slice(0, 0, 3), "time_embedding (head e)"));
  EXPECT_TRUE(close(e0, t("inf.e0"), "e0 (time_projection, t and t=0)"));
  EXPECT_TRUE(close(model->embed_time(t("in.t_sink").reshape({-1})).second, t("sink.e0"), "sink e0"));
  EXPECT_TRUE(close(model->frame_packer(t("in.motion_latents")[0]), t("sink.frame_packer.tokens"), "frame_packer"));
  auto [x, segs] = model->cond_tokens(t("in.ref_latents")[0], t("in.motion_latents")[0]);
  EXPECT_TRUE(close(x, t("sink.x_into_blocks"), "sink tokens (+ trainable_cond_mask)"));
  EXPECT_TRUE(at::equal(rope_table(rope_positions(segs, 4), 16), stored_table(ck_, "inf.freqs_cond")))
      << "cond table with roll-out 4";
  EXPECT_EQ(model->cond_rollout(27, t("inf.rope_rel_dist").item<int64_t>()), t("inf.cond_rollout_frames").item<int64_t>());
  auto [g, loc] = model->encode_audio(t("in.audio_input"));
  EXPECT_TRUE(close(g, t("inf.audio_emb_global").slice(1, 19), "audio global tokens [19:]"));
  EXPECT_TRUE(close(loc, t("inf.audio_emb_local").slice(1, 19), "audio local tokens [19:]"));
}

TEST(AudioGolden, EncoderAndInjectorsMatchUpstream) {
  if (!have_fixture("audio_path.safetensors")) GTEST_SKIP() << "no audio_path.safetensors fixture";
  at::NoGradGuard no_grad;
  const auto ck = weights::load_safetensors(fixture("audio_path.safetensors"));
  auto model = load_fixture_model();
  const auto& a = at_key(ck, "in.audio_input");
  const auto padded = at::cat({a.slice(3, 0, 1).repeat({1, 1, 1, 73}), a}, 3);
  auto [g, loc] = model->casual_audio_encoder->forward(padded);
  EXPECT_TRUE(close(g, at_key(ck, "enc.audio_emb_global"), "casual_audio_encoder global"));
  EXPECT_TRUE(close(loc, at_key(ck, "enc.audio_emb_local"), "casual_audio_encoder local"));
  const auto& hidden = at_key(ck, "in.hidden_states");
  for (int j = 0; j < 2; ++j) {
    const auto J = std::to_string(j);
    const auto res = model->audio_injector->forward(j, hidden, at_key(ck, "enc.audio_emb_local").slice(1, 19),
                                                    at_key(ck, "enc.audio_emb_global").slice(1, 19));
    EXPECT_TRUE(close(res.reshape({3, 32, 64}), at_key(ck, "inj" + J + ".injector_out"), "injector " + J));
    EXPECT_TRUE(close(hidden + res, at_key(ck, "inj" + J + ".out"), "after injection " + J));
  }
}

TensorMap stream_inputs(const weights::Checkpoint& ck, bool roll_sink) {
  TensorMap in{{"ref_latents", at_key(ck, "in.ref_latents")},
               {"motion_latents", at_key(ck, "in.motion_latents")},
               {"context", at_key(ck, "in.context")},
               {"audio", at_key(ck, "in.audio_emb")},
               {"num_blocks", at::tensor(int64_t{8})},
               {"seed", at::tensor(int64_t{420})},
               {"roll_sink", at::tensor(int64_t{roll_sink ? 1 : 0})},
               {"rope_offsets", at_key(ck, "rope_rel_dist").reshape({-1})}};
  return in;
}

TEST(StreamingGolden, SeededNoiseIsUpstreamNoise) {
  if (!have_fixture("streaming.safetensors")) GTEST_SKIP() << "no streaming.safetensors fixture";
  const auto ck = weights::load_safetensors(fixture("streaming.safetensors"));
  for (int r = 0; r < 2; ++r) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(420 + r);
    EXPECT_TRUE(at::equal(at::randn({16, 12, 8, 16}, gen), at_key(ck, "in.clip" + std::to_string(r) + ".noise")))
        << "clip " << r;
  }
}

TEST(StreamingGolden, TwoClipsWithRingWrapMatchUpstream) {
  if (!have_fixture("streaming.safetensors")) GTEST_SKIP() << "no streaming.safetensors fixture";
  const auto ck = weights::load_safetensors(fixture("streaming.safetensors"));
  const auto out = tool::run(fixture_request("stream"), stream_inputs(ck, /*roll_sink=*/false));
  for (int b = 0; b < 8; ++b) {
    const auto B = std::to_string(b);
    for (int i = 0; i < 4; ++i)
      EXPECT_TRUE(close(out.at("velocity." + B + "." + std::to_string(i)),
                        at_key(ck, "b" + B + ".s" + std::to_string(i) + ".velocity"),
                        "stream b" + B + " s" + std::to_string(i) + " velocity"));
    EXPECT_TRUE(close(out.at("latents." + B), at_key(ck, "b" + B + ".s3.latent"), "stream b" + B + " latent"));
  }
  EXPECT_TRUE(at::equal(out.at("rope_offsets"), at_key(ck, "rope_rel_dist").reshape({-1})));
}

TEST(StreamingGolden, RollingSinkRefreshMatchesUpstream) {
  if (!have_fixture("streaming_refresh.safetensors")) GTEST_SKIP() << "no streaming_refresh.safetensors fixture";
  const auto ck = weights::load_safetensors(fixture("streaming_refresh.safetensors"));
  const auto base = weights::load_safetensors(fixture("streaming.safetensors"));
  auto in = stream_inputs(base, /*roll_sink=*/true);
  const auto out = tool::run(fixture_request("stream"), in);
  for (int b = 4; b < 8; ++b) {
    const auto B = std::to_string(b);
    for (int i = 0; i < 4; ++i)
      EXPECT_TRUE(close(out.at("velocity." + B + "." + std::to_string(i)),
                        at_key(ck, "b" + B + ".s" + std::to_string(i) + ".velocity"),
                        "refresh b" + B + " s" + std::to_string(i) + " velocity"));
    EXPECT_TRUE(close(out.at("latents." + B), at_key(ck, "b" + B + ".s3.latent"), "refresh b" + B + " latent"));
  }
}

}  // namespace
}  // namespace liveavatar::dit::test
