// wav2vec2 loading: both weight-norm spellings, pytorch_model.bin, and errors that name what is wrong.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>

#include "audio/audio_encoder.h"
#include "weights/weights.h"
#include "test_util.h"

namespace liveavatar::audio {
namespace {

const std::string kDir = WAV2VEC2_FIXTURES_DIR;
const std::string kModel = kDir + "/wav2vec2-large-xlsr-53-english";

struct TempDir {
  std::string path;
  TempDir() {
    char tmpl[] = "/tmp/liveavatar-audio-XXXXXX";
    path = ::mkdtemp(tmpl);
  }
  ~TempDir() { std::system(("rm -rf '" + path + "'").c_str()); }
};

void copy_file(const std::string& from, const std::string& to) {
  std::ifstream in(from, std::ios::binary);
  std::ofstream out(to, std::ios::binary);
  out << in.rdbuf();
}

at::Tensor input() {
  return weights::load_safetensors(kDir + "/audio_features.safetensors").tensors.at("input_values").clone();
}

TEST(Wav2Vec2Load, ParametrizationNamesAndPthAgree) {
  const auto ck = weights::load_safetensors(kModel + "/model.safetensors");
  std::map<std::string, at::Tensor> renamed;
  for (const auto& [k, t] : ck.tensors) {
    std::string key = k;
    const auto pos = key.find("conv.weight_g");
    if (pos != std::string::npos) key.replace(pos, 13, "conv.parametrizations.weight.original0");
    const auto pos_v = key.find("conv.weight_v");
    if (pos_v != std::string::npos) key.replace(pos_v, 13, "conv.parametrizations.weight.original1");
    renamed[key] = t;
  }
  ASSERT_TRUE(renamed.count("wav2vec2.encoder.pos_conv_embed.conv.parametrizations.weight.original1"));
  TempDir dir;
  copy_file(kModel + "/config.json", dir.path + "/config.json");
  copy_file(kModel + "/preprocessor_config.json", dir.path + "/preprocessor_config.json");
  weights::save_pth(dir.path + "/pytorch_model.bin", renamed);
  const auto a = AudioEncoder::from_folder(kModel).hidden_states(input());
  const auto b = AudioEncoder::from_folder(dir.path).hidden_states(input());
  EXPECT_TRUE(at::equal(a, b));
}

TEST(Wav2Vec2Load, MissingConfigNamesTheFile) {
  TempDir dir;
  try {
    AudioEncoder::from_folder(dir.path);
    FAIL() << "no error";
  } catch (const AudioError& e) {
    EXPECT_NE(std::string(e.what()).find(dir.path + "/config.json"), std::string::npos) << e.what();
  }
}

TEST(Wav2Vec2Load, MissingWeightsNamesBothFiles) {
  TempDir dir;
  copy_file(kModel + "/config.json", dir.path + "/config.json");
  try {
    AudioEncoder::from_folder(dir.path);
    FAIL() << "no error";
  } catch (const AudioError& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("model.safetensors"), std::string::npos) << m;
    EXPECT_NE(m.find("pytorch_model.bin"), std::string::npos) << m;
  }
}

TEST(Wav2Vec2Load, UnknownAndMissingKeysFail) {
  auto ck = weights::load_safetensors(kModel + "/model.safetensors");
  AudioEncoder enc(AudioEncoder::from_folder(kModel).config());
  auto extra = ck;
  extra.tensors["wav2vec2.encoder.layers.24.layer_norm.weight"] = at::ones({32});
  EXPECT_THROW(enc.load(extra), weights::WeightsError);
  auto missing = ck;
  missing.tensors.erase("wav2vec2.encoder.layers.3.attention.q_proj.weight");
  try {
    enc.load(missing);
    FAIL() << "no error";
  } catch (const weights::WeightsError& e) {
    EXPECT_NE(std::string(e.what()).find("encoder.layers.3.attention.q_proj.weight"), std::string::npos) << e.what();
  }
}

TEST(Wav2Vec2Load, UnsupportedConfigSaysWhy) {
  Wav2Vec2Config c;
  c.feat_extract_norm = "group";
  EXPECT_THROW(c.validate(), AudioError);
  c = Wav2Vec2Config{};
  c.hidden_size = 1000;  // not a multiple of 16 heads
  EXPECT_THROW(c.validate(), AudioError);
}

TEST(Wav2Vec2Load, TooShortInputIsAnError) {
  const AudioEncoder enc(Wav2Vec2Config::tiny());
  EXPECT_THROW(enc.hidden_states(at::zeros({399})), AudioError);
  EXPECT_EQ(enc.hidden_states(at::zeros({400})).size(1), 1);
}

TEST(Wav2Vec2Load, RealSizeParameterCount) {
  // wav2vec2-large-xlsr-53 without the CTC head and masked_spec_embed (counted by hand from the layer shapes).
  const AudioEncoder enc(Wav2Vec2Config{});
  EXPECT_EQ(enc.parameter_count(), 315437696u);
}

}  // namespace
}  // namespace liveavatar::audio
