// The planner's view of a checkpoint: config.json only (never a weight file), read with the rules of
// dit::ModelConfig::from_json_file. SPDX-License-Identifier: LGPL-2.1-or-later
#include <nlohmann/json.hpp>

#include <fstream>
#include <type_traits>

#include "planner.h"

namespace liveavatar::runtime {

PlannerModelShape PlannerModelShape::from_config_json(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw PlanError(path + ": cannot open the model config (expected the checkpoint's config.json)");
  nlohmann::json j;
  try {
    in >> j;
  } catch (const std::exception& e) {
    throw PlanError(path + ": not valid JSON: " + e.what());
  }
  // The golden fixtures nest the constructor arguments; a checkpoint's config.json has them at the top.
  if (j.contains("constructor_args") && j["constructor_args"].is_object()) {
    nlohmann::json args = j["constructor_args"];
    j = args;
  }
  if (!j.is_object()) throw PlanError(path + ": the model config must be a JSON object");
  PlannerModelShape m;
  try {
    auto get = [&](const char* key, auto& field) {
      if (j.contains(key) && !j[key].is_null()) field = j[key].get<std::decay_t<decltype(field)>>();
    };
    get("dim", m.dim);
    get("ffn_dim", m.ffn_dim);
    get("num_heads", m.num_heads);
    get("num_layers", m.num_layers);
    get("in_dim", m.in_dim);
    get("out_dim", m.out_dim);
    get("cond_dim", m.cond_dim);
    get("text_dim", m.text_dim);
    get("text_len", m.text_len);
    get("freq_dim", m.freq_dim);
    get("audio_dim", m.audio_dim);
    get("num_audio_token", m.num_audio_token);
    get("audio_inject_layers", m.audio_inject_layers);
    get("enable_adain", m.enable_adain);
    if (j.contains("adain_mode") && !j["adain_mode"].is_null())
      m.adain_output_layers = j["adain_mode"].get<std::string>() != "attn_norm";
    if (j.contains("patch_size")) {
      const auto p = j["patch_size"].get<std::vector<int64_t>>();
      if (p.size() != 3) throw PlanError(path + ": patch_size must have 3 entries");
      m.patch_size = {p[0], p[1], p[2]};
    }
    auto require = [&](const char* key, bool expected) {
      if (j.contains(key) && j[key].is_boolean() && j[key].get<bool>() != expected)
        throw PlanError(path + ": " + key + "=" + (expected ? "false" : "true") + " is not supported (LiveAvatar uses " +
                        (expected ? "true" : "false") + ")");
    };
    require("enable_framepack", true);
    require("enable_motioner", false);
    require("zero_timestep", true);
    if (j.contains("framepack_drop_mode") && j["framepack_drop_mode"] != "padd")
      throw PlanError(path + ": framepack_drop_mode must be \"padd\" (all motion buckets are used)");
  } catch (const nlohmann::json::exception& e) {
    throw PlanError(path + ": a field has the wrong type: " + e.what());
  }
  try {
    m.validate();
  } catch (const PlanError& e) {
    throw PlanError(path + ": " + e.what());
  }
  return m;
}

Decision decide_for_checkpoint(const std::string& checkpoint_dir, PlanRequest request) {
  request.model = PlannerModelShape::from_config_json(checkpoint_dir + "/config.json");
  return decide(request);
}

}  // namespace liveavatar::runtime
