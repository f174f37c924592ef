// ModelConfig: defaults, validation messages, exact parameter count, config.json reading.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "golden_util.h"

namespace liveavatar::dit::test {
namespace {

TEST(ModelConfig, DefaultsAreThe14BModel) {
  const ModelConfig c;
  EXPECT_EQ(c.dim, 5120);
  EXPECT_EQ(c.num_layers, 40);
  EXPECT_EQ(c.num_heads, 40);
  EXPECT_EQ(c.ffn_dim, 13824);
  EXPECT_EQ(c.audio_inject_layers.size(), 12u);
  EXPECT_EQ(c.lat_motion_frames(), 19);
  EXPECT_NO_THROW(c.validate());
}

// DESIGN.md: 16,295,755,609 parameters for the 14B DiT (derived from the upstream code).
TEST(ModelConfig, ParameterCountOf14BIsTheUpstreamFigure) {
  EXPECT_EQ(ModelConfig{}.parameter_count(), 16295755609ull);
}

TEST(ModelConfig, ParameterCountMatchesTheBuiltTinyModel) {
  const auto cfg = ModelConfig::tiny();
  CausalWanModelS2V model(cfg);
  uint64_t n = 0;
  for (const auto& p : model->parameters()) n += static_cast<uint64_t>(p.numel());
  EXPECT_EQ(n, cfg.parameter_count());
}

TEST(ModelConfig, RejectsInconsistentShapes) {
  auto bad = ModelConfig::tiny();
  bad.num_heads = 5;
  EXPECT_THROW(bad.validate(), DitError);
  bad = ModelConfig::tiny();
  bad.audio_inject_layers = {0, 2};
  try {
    bad.validate();
    FAIL() << "layer 2 of 2 accepted";
  } catch (const DitError& e) {
    EXPECT_NE(std::string(e.what()).find("audio_inject_layers"), std::string::npos) << e.what();
  }
  bad = ModelConfig::tiny();
  bad.clip_frames = 10;
  EXPECT_THROW(bad.validate(), DitError);
}

TEST(ModelConfig, ReadsTheFixtureConfig) {
  if (!have_fixture("config.json")) GTEST_SKIP() << "no fixture config.json";
  const auto c = ModelConfig::from_json_file(fixture("config.json"));
  EXPECT_EQ(c.dim, 64);
  EXPECT_EQ(c.text_dim, 48);
  EXPECT_EQ(c.num_layers, 2);
  EXPECT_EQ(c.audio_inject_layers, (std::vector<int64_t>{0, 1}));
}

TEST(ModelConfig, MissingFileIsAnActionableError) {
  try {
    ModelConfig::from_json_file("/nonexistent/config.json");
    FAIL();
  } catch (const DitError& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/config.json"), std::string::npos);
  }
}

// A number that does not fit an integer field (found by the model_config fuzzer: 2.9e40 in audio_inject_layers was
// cast to int64_t, undefined behaviour) or a fraction is refused as a wrong type, naming the value.
TEST(ModelConfig, NumbersThatDoNotFitAnIntegerFieldAreRefused) {
  const std::vector<std::string> bad = {R"({"dim": 2.9e53})", R"({"num_layers": 40.5})",
                                        R"({"audio_inject_layers": [0, 29111111111111111111111111111111111111111]})",
                                        R"({"ffn_dim": 18446744073709551615})", R"({"patch_size": [1, 2.5, 2]})",
                                        R"({"num_heads": "40"})"};
  for (const auto& text : bad) {
    try {
      ModelConfig::from_json_text(text, "config.json");
      ADD_FAILURE() << text << " was accepted";
    } catch (const DitError& e) {
      EXPECT_NE(std::string(e.what()).find("config.json: a field has the wrong type"), std::string::npos)
          << text << " -> " << e.what();
    }
  }
  EXPECT_EQ(ModelConfig::from_json_text(R"({"dim": 5120, "eps": 1})", "config.json").eps, 1.0);
}

TEST(Weights, FixtureCheckpointLoadsStrictly) {
  if (!have_fixture("weights.safetensors")) GTEST_SKIP() << "no fixture weights";
  EXPECT_NO_THROW(load_fixture_model());
}

}  // namespace
}  // namespace liveavatar::dit::test
