// Wav2Vec2Config: defaults (wav2vec2-large-xlsr-53), config.json + preprocessor_config.json reading, validation.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <nlohmann/json.hpp>

#include <fstream>

#include "audio/audio_encoder.h"
#include "weights/json_field.h"

namespace liveavatar::audio {
namespace {

nlohmann::json read_json(const std::string& path, bool required) {
  std::ifstream in(path);
  if (!in) {
    if (!required) return nlohmann::json::object();
    throw AudioError(path + ": cannot open the wav2vec2 config (expected the HF folder's config.json)");
  }
  nlohmann::json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    throw AudioError(path + ": not valid JSON: " + e.what());
  }
  if (!j.is_object()) throw AudioError(path + ": expected a JSON object");
  return j;
}

std::string sibling(const std::string& path, const std::string& name) {
  const auto slash = path.find_last_of('/');
  return (slash == std::string::npos ? std::string() : path.substr(0, slash + 1)) + name;
}

}  // namespace

Wav2Vec2Config Wav2Vec2Config::tiny() {
  Wav2Vec2Config c;
  c.hidden_size = 32;
  c.num_hidden_layers = 24;
  c.num_attention_heads = 2;
  c.intermediate_size = 64;
  c.conv_dim = {32, 32, 32, 32, 32, 32, 32};
  c.num_conv_pos_embeddings = 16;
  c.num_conv_pos_embedding_groups = 16;
  return c;
}

Wav2Vec2Config Wav2Vec2Config::from_json_file(const std::string& path) {
  const auto j = read_json(path, /*required=*/true);
  const auto pre = read_json(sibling(path, "preprocessor_config.json"), /*required=*/false);
  Wav2Vec2Config c;
  try {
    auto get = [](const nlohmann::json& src, const char* key, auto& field) {
      if (src.contains(key) && !src[key].is_null()) weights::read_json_field(src[key], field);
    };
    get(j, "hidden_size", c.hidden_size);
    get(j, "num_hidden_layers", c.num_hidden_layers);
    get(j, "num_attention_heads", c.num_attention_heads);
    get(j, "intermediate_size", c.intermediate_size);
    get(j, "conv_dim", c.conv_dim);
    get(j, "conv_kernel", c.conv_kernel);
    get(j, "conv_stride", c.conv_stride);
    get(j, "conv_bias", c.conv_bias);
    get(j, "num_conv_pos_embeddings", c.num_conv_pos_embeddings);
    get(j, "num_conv_pos_embedding_groups", c.num_conv_pos_embedding_groups);
    get(j, "layer_norm_eps", c.layer_norm_eps);
    get(j, "feat_extract_norm", c.feat_extract_norm);
    get(j, "do_stable_layer_norm", c.do_stable_layer_norm);
    get(j, "vocab_size", c.vocab_size);
    get(j, "hidden_act", c.hidden_act);
    get(j, "feat_extract_activation", c.feat_extract_activation);
    get(pre, "sampling_rate", c.sampling_rate);
    get(pre, "do_normalize", c.do_normalize);
  } catch (const std::exception& e) {
    throw AudioError(path + ": a field has the wrong type: " + e.what());
  }
  try {
    c.validate();
  } catch (const AudioError& e) {
    throw AudioError(path + ": " + e.what());
  }
  return c;
}

void Wav2Vec2Config::validate() const {
  auto fail = [](const std::string& m) { throw AudioError(m); };
  if (feat_extract_norm != "layer")
    fail("feat_extract_norm '" + feat_extract_norm +
         "' is not supported (only \"layer\", the wav2vec2-large-xlsr-53 family LiveAvatar uses)");
  if (!do_stable_layer_norm)
    fail("do_stable_layer_norm=false is not supported (only the pre-LN encoder of wav2vec2-large-xlsr-53)");
  if (hidden_act != "gelu" || feat_extract_activation != "gelu")
    fail("activation '" + hidden_act + "' / '" + feat_extract_activation + "' is not supported (only \"gelu\")");
  if (conv_dim.empty() || conv_dim.size() != conv_kernel.size() || conv_dim.size() != conv_stride.size())
    fail("conv_dim, conv_kernel and conv_stride must be non-empty and of equal length (got " +
         std::to_string(conv_dim.size()) + ", " + std::to_string(conv_kernel.size()) + ", " +
         std::to_string(conv_stride.size()) + ")");
  for (size_t i = 0; i < conv_dim.size(); ++i)
    if (conv_dim[i] <= 0 || conv_kernel[i] <= 0 || conv_stride[i] <= 0)
      fail("conv layer " + std::to_string(i) + " has a non-positive dim, kernel or stride");
  if (hidden_size <= 0 || num_hidden_layers <= 0 || num_attention_heads <= 0 || intermediate_size <= 0)
    fail("hidden_size, num_hidden_layers, num_attention_heads and intermediate_size must be positive");
  if (hidden_size % num_attention_heads != 0)
    fail("hidden_size " + std::to_string(hidden_size) + " is not a multiple of num_attention_heads " +
         std::to_string(num_attention_heads));
  if (num_conv_pos_embeddings <= 0 || num_conv_pos_embedding_groups <= 0 ||
      hidden_size % num_conv_pos_embedding_groups != 0)
    fail("hidden_size " + std::to_string(hidden_size) + " must be a multiple of num_conv_pos_embedding_groups " +
         std::to_string(num_conv_pos_embedding_groups) + " (and both, with num_conv_pos_embeddings, positive)");
  if (sampling_rate <= 0) fail("sampling_rate must be positive");
}

int64_t Wav2Vec2Config::frames_for_samples(int64_t samples) const {
  int64_t n = samples;
  for (size_t i = 0; i < conv_kernel.size(); ++i) {
    if (n < conv_kernel[i]) return 0;
    n = (n - conv_kernel[i]) / conv_stride[i] + 1;
  }
  return n;
}

int64_t Wav2Vec2Config::hop() const {
  int64_t h = 1;
  for (const auto s : conv_stride) h *= s;
  return h;
}

int64_t Wav2Vec2Config::receptive_field() const {
  int64_t field = 1, jump = 1;
  for (size_t i = 0; i < conv_kernel.size(); ++i) {
    field += (conv_kernel[i] - 1) * jump;
    jump *= conv_stride[i];
  }
  return field;
}

}  // namespace liveavatar::audio
