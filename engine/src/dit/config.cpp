// ModelConfig: defaults (14B), the tiny test shape, config.json reading, validation, exact parameter count.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <nlohmann/json.hpp>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <set>

#include "dit/config.h"
#include "weights/json_field.h"

namespace liveavatar::dit {

ModelConfig ModelConfig::tiny() {
  ModelConfig c;
  c.dim = 64;
  c.ffn_dim = 128;
  c.num_heads = 4;
  c.num_layers = 2;
  c.audio_inject_layers = {0, 1};
  c.audio_dim = 32;
  c.text_dim = 32;
  c.text_len = 16;
  c.freq_dim = 32;
  c.cond_dim = 16;
  return c;
}

ModelConfig ModelConfig::medium() {
  ModelConfig c;
  c.dim = 1536;
  c.ffn_dim = 4096;
  c.num_heads = 12;
  c.num_layers = 12;
  c.audio_inject_layers = {0, 3, 6, 9, 11};
  return c;
}

ModelConfig ModelConfig::from_json_file(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw DitError(path + ": cannot open the model config (expected the checkpoint's config.json)");
  std::stringstream text;
  text << in.rdbuf();
  return from_json_text(text.str(), path);
}

ModelConfig ModelConfig::from_json_text(const std::string& text, const std::string& path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const std::exception& e) {
    throw DitError(path + ": not valid JSON: " + e.what());
  }
  // The golden fixtures nest the constructor arguments; a checkpoint's config.json has them at the top.
  if (j.is_object() && j.contains("constructor_args") && j["constructor_args"].is_object()) {
    nlohmann::json args = j["constructor_args"];
    j = args;
  }
  if (!j.is_object()) throw DitError(path + ": the model config must be a JSON object");
  ModelConfig c;
  try {
    auto get = [&](const char* key, auto& field) {
      if (j.contains(key) && !j[key].is_null()) weights::read_json_field(j[key], field);
    };
    get("dim", c.dim);
    get("ffn_dim", c.ffn_dim);
    get("num_heads", c.num_heads);
    get("num_layers", c.num_layers);
    get("in_dim", c.in_dim);
    get("out_dim", c.out_dim);
    get("cond_dim", c.cond_dim);
    get("text_dim", c.text_dim);
    get("text_len", c.text_len);
    get("freq_dim", c.freq_dim);
    get("audio_dim", c.audio_dim);
    get("num_audio_token", c.num_audio_token);
    get("audio_inject_layers", c.audio_inject_layers);
    get("enable_adain", c.enable_adain);
    get("adain_mode", c.adain_mode);
    get("eps", c.eps);
    if (j.contains("patch_size")) {
      std::vector<int64_t> p;
      weights::read_json_field(j["patch_size"], p);
      if (p.size() != 3) throw DitError(path + ": patch_size must have 3 entries");
      c.patch_size = {p[0], p[1], p[2]};
    }
    auto require = [&](const char* key, bool expected) {
      if (j.contains(key) && j[key].is_boolean() && j[key].get<bool>() != expected)
        throw DitError(path + ": " + key + "=" + (expected ? "false" : "true") + " is not supported (LiveAvatar uses " +
                       (expected ? "true" : "false") + ")");
    };
    require("enable_framepack", true);
    require("enable_motioner", false);
    require("zero_timestep", true);
    if (j.contains("framepack_drop_mode") && j["framepack_drop_mode"] != "padd")
      throw DitError(path + ": framepack_drop_mode must be \"padd\" (all motion buckets are used)");
  } catch (const DitError&) {
    throw;
  } catch (const std::exception& e) {  // nlohmann's type errors, read_json_field's range errors
    throw DitError(path + ": a field has the wrong type: " + e.what());
  }
  try {
    c.validate();
  } catch (const DitError& e) {
    throw DitError(path + ": " + e.what());
  }
  return c;
}

std::string to_config_json(const ModelConfig& c) {
  const nlohmann::json j = {{"_class_name", "WanModel_S2V"},
                            {"model_type", "s2v"},
                            {"dim", c.dim},
                            {"ffn_dim", c.ffn_dim},
                            {"num_heads", c.num_heads},
                            {"num_layers", c.num_layers},
                            {"in_dim", c.in_dim},
                            {"out_dim", c.out_dim},
                            {"freq_dim", c.freq_dim},
                            {"text_dim", c.text_dim},
                            {"cond_dim", c.cond_dim},
                            {"audio_dim", c.audio_dim},
                            {"num_audio_token", c.num_audio_token},
                            {"audio_inject_layers", c.audio_inject_layers},
                            {"enable_adain", c.enable_adain},
                            {"adain_mode", c.adain_mode},
                            {"enable_framepack", true},
                            {"framepack_drop_mode", "padd"},
                            {"enable_motioner", false},
                            {"zero_timestep", true},
                            {"patch_size", c.patch_size},
                            {"qk_norm", true},
                            {"cross_attn_norm", true},
                            {"eps", c.eps}};
  return j.dump(2) + "\n";
}

void ModelConfig::validate() const {
  auto fail = [](const std::string& m) { throw DitError("model config: " + m); };
  auto s = [](int64_t v) { return std::to_string(v); };
  if (dim <= 0 || num_heads <= 0 || num_layers <= 0 || ffn_dim <= 0)
    fail("dim, num_heads, num_layers and ffn_dim must be positive");
  // Model files are untrusted input: bound the shape before anything is sized from it.
  if (dim > (1 << 20) || ffn_dim > (1 << 22) || num_layers > 10000 || num_heads > 4096 || text_len > (1 << 20) ||
      text_dim > (1 << 20) || audio_dim > (1 << 20) || freq_dim > (1 << 20) || cond_dim > (1 << 16) ||
      audio_layers > 4096 || num_audio_token > 4096 || out_dim > (1 << 16))
    fail("implausible shape (dim <= 2^20, ffn_dim <= 2^22, num_layers <= 10000, ...): not a DiT config");
  if (dim % num_heads != 0) fail("dim " + s(dim) + " is not a multiple of num_heads " + s(num_heads));
  if (head_dim() % 2 != 0) fail("head_dim " + s(head_dim()) + " must be even (RoPE pairs)");
  if (dim % 4 != 0) fail("dim " + s(dim) + " must be a multiple of 4 (audio encoder widths dim/4, dim/2)");
  if (freq_dim % 2 != 0 || freq_dim <= 0) fail("freq_dim " + s(freq_dim) + " must be positive and even");
  if (patch_size != std::array<int64_t, 3>{1, 2, 2})
    fail("patch_size must be (1, 2, 2): the FramePack RoPE layout assumes it");
  if (in_dim != 16) fail("in_dim " + s(in_dim) + ": the FramePack projections take 16 latent channels");
  if (out_dim <= 0 || cond_dim <= 0) fail("out_dim and cond_dim must be positive");
  if (text_len <= 0 || text_dim <= 0 || audio_dim <= 0 || audio_layers <= 0 || num_audio_token <= 0)
    fail("text_len, text_dim, audio_dim, audio_layers and num_audio_token must be positive");
  std::set<int64_t> seen;
  for (int64_t l : audio_inject_layers) {
    if (l < 0 || l >= num_layers) fail("audio_inject_layers has " + s(l) + ", outside [0, " + s(num_layers) + ")");
    if (!seen.insert(l).second) fail("audio_inject_layers lists layer " + s(l) + " twice");
  }
  if (framepack_buckets[0] <= 0 || framepack_buckets[1] % 2 != 0 || framepack_buckets[2] % 4 != 0 ||
      framepack_buckets[1] <= 0 || framepack_buckets[2] <= 0)
    fail("framepack_buckets must be (n, 2k, 4m) with positive entries");
  if (frames_per_block <= 0 || clip_frames <= 0 || clip_frames % frames_per_block != 0)
    fail("clip_frames " + s(clip_frames) + " must be a positive multiple of frames_per_block " + s(frames_per_block));
  if (rope_offset_min > rope_offset_max) fail("rope_offset_min > rope_offset_max");
  if (sampling_steps <= 0) fail("sampling_steps must be positive");
  if (motion_frames <= 0) fail("motion_frames must be positive");
}

uint64_t ModelConfig::parameter_count() const {
  using u = uint64_t;
  const u d = static_cast<u>(dim), f = static_cast<u>(ffn_dim);
  const u patch = static_cast<u>(patch_size[0] * patch_size[1] * patch_size[2]);
  const u attn = 4 * (d * d + d) + 2 * d;
  const u block = 2 * attn + 2 * d + (d * f + f) + (f * d + d) + 6 * d;
  u n = 0;
  n += static_cast<u>(in_dim) * d * patch + d;                        // patch_embedding
  n += static_cast<u>(text_dim) * d + d + d * d + d;                  // text_embedding
  n += static_cast<u>(freq_dim) * d + d + d * d + d;                  // time_embedding
  n += d * 6 * d + 6 * d;                                              // time_projection
  n += static_cast<u>(num_layers) * block;                             // blocks
  n += d * static_cast<u>(out_dim) * patch + static_cast<u>(out_dim) * patch + 2 * d;  // head
  n += static_cast<u>(cond_dim) * d * patch + d;                       // cond_encoder
  const u a = static_cast<u>(audio_dim), q = d / 4;
  n += static_cast<u>(audio_layers);                                   // casual_audio_encoder.weights
  n += a * q * static_cast<u>(num_audio_token) * 3 + q * static_cast<u>(num_audio_token);  // conv1_local
  if (enable_adain) n += a * q * 3 + q + d * d + d;                    // conv1_global, final_linear
  n += q * (d / 2) * 3 + d / 2 + (d / 2) * d * 3 + d + d;              // conv2, conv3, padding_tokens
  const u inj = static_cast<u>(audio_inject_layers.size());
  n += inj * attn;                                                     // audio_injector.injector
  if (enable_adain) n += inj * (d * 2 * d + 2 * d);                    // injector_adain_layers
  if (enable_adain && adain_mode != "attn_norm") n += inj * (d * d + d);  // injector_adain_output_layers
  n += 3 * d;                                                          // trainable_cond_mask
  n += 16 * d * (4 + 32 + 256) + 3 * d;                                // frame_packer
  return n;
}

}  // namespace liveavatar::dit
