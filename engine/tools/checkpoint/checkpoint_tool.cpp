// SPDX-License-Identifier: LGPL-2.1-or-later
#include "checkpoint_tool.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <functional>
#include <iomanip>
#include <nlohmann/json.hpp>
#include <sstream>

namespace liveavatar::weights {

namespace {

using json = nlohmann::json;

bool exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

void make_dirs(const std::string& path) {
  std::string cur = (!path.empty() && path[0] == '/') ? "/" : "";
  std::stringstream ss(path);
  std::string part;
  while (std::getline(ss, part, '/')) {
    if (part.empty()) continue;
    cur += part + "/";
    if (::mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST) {
      throw WeightsError(cur, std::string("cannot create directory: ") + std::strerror(errno));
    }
  }
}

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw WeightsError(path, "cannot open");
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

void write_text(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  if (!out) throw WeightsError(path, "cannot write");
}

std::string basename_of(const std::string& p) {
  auto s = p.rfind('/');
  return s == std::string::npos ? p : p.substr(s + 1);
}

std::string dtype_name(at::ScalarType t) {
  auto n = safetensors_dtype_name(t);
  return n ? *n : std::string(c10::toString(t));
}

// Seeded random values for a layout: norm scales / gammas near 1, everything else small.
std::map<std::string, at::Tensor> random_weights(const Layout& layout, at::Generator& gen) {
  std::map<std::string, at::Tensor> out;
  for (const auto& kv : layout) {
    at::Tensor t = at::randn(kv.second.shape, gen, at::TensorOptions().dtype(at::kFloat)) * 0.05;
    const std::string& k = kv.first;
    bool norm_scale = k.find("norm") != std::string::npos && k.size() > 7 &&
                      k.compare(k.size() - 7, 7, ".weight") == 0;
    if (norm_scale || k.find(".gamma") != std::string::npos) t = t + 1.0;
    out[k] = t.to(kv.second.dtype);
  }
  return out;
}

struct Paths {
  std::string dit_index, dit_single, dit_config, vae, t5, w2v_dir, lora;
};

// The official layout under `dir`, or the same file names directly in `dir`.
Paths resolve(const std::string& dir) {
  auto pick = [&](const std::string& rel) {
    std::string p = dir + "/" + rel;
    return exists(p) ? p : dir + "/" + basename_of(rel);
  };
  Paths p;
  p.dit_index = pick(OfficialFiles::kDitIndex);
  p.dit_single = pick(std::string(OfficialFiles::kDitDir) + "/diffusion_pytorch_model.safetensors");
  p.dit_config = pick(OfficialFiles::kDitConfig);
  p.vae = pick(OfficialFiles::kVae);
  p.t5 = pick(OfficialFiles::kT5);
  p.w2v_dir = pick(OfficialFiles::kWav2Vec2Dir);
  p.lora = pick(OfficialFiles::kLora);
  return p;
}

void add_component(InspectResult& r, const std::string& name, const std::string& path, const Layout& layout,
                   const std::function<Checkpoint()>& load) {
  ComponentReport c;
  c.name = name;
  c.path = path;
  c.found = exists(path);
  if (c.found) {
    try {
      Checkpoint ck = load();
      c.numel = ck.numel();
      for (const auto& kv : ck.tensors) c.bytes_per_dtype[dtype_name(kv.second.scalar_type())] += kv.second.nbytes();
      c.validation = check_layout(layout, ck, /*check_dtype=*/false);
    } catch (const std::exception& e) {
      c.error = e.what();
    }
  }
  r.components.push_back(std::move(c));
}

}  // namespace

bool InspectResult::ok() const {
  for (const auto& c : components)
    if (!c.ok()) return false;
  return !components.empty();
}

std::string InspectResult::to_string() const {
  std::ostringstream s;
  s << "configuration: " << config_source << "\n";
  uint64_t total = 0;
  for (const auto& c : components) {
    const char* status = !c.found ? "MISSING" : !c.error.empty() ? "ERROR" : !c.validation.ok() ? "MISMATCH" : "OK";
    s << std::left << std::setw(9) << c.name << std::setw(9) << status << c.path << "\n";
    if (!c.found) continue;
    if (!c.error.empty()) {
      s << "    " << c.error << "\n";
      continue;
    }
    s << "    parameters: " << c.numel << "\n";
    for (const auto& b : c.bytes_per_dtype) s << "    " << b.first << ": " << b.second << " bytes\n";
    if (!c.validation.ok()) {
      std::istringstream lines(c.validation.to_string());
      std::string line;
      while (std::getline(lines, line)) s << "    " << line << "\n";
    }
    total += c.numel;
  }
  s << "total parameters: " << total << "\n" << (ok() ? "valid" : "NOT valid") << "\n";
  return s.str();
}

InspectResult inspect_checkpoint(const std::string& dir) {
  Paths p = resolve(dir);
  InspectResult r;
  ModelConfig cfg;  // the published 14B set unless the DiT config says otherwise
  r.config_source = "built-in Wan2.2-S2V-14B defaults (no config.json found)";
  if (exists(p.dit_config)) {
    std::string text = read_text(p.dit_config);
    cfg.dit = dit::ModelConfig::from_json_text(text, p.dit_config);
    r.config_source = p.dit_config;
    if (text.find("\"liveavatar_tiny\": true") != std::string::npos) {
      ModelConfig tiny = ModelConfig::tiny();
      cfg.vae = tiny.vae;
      cfg.t5 = tiny.t5;
      cfg.lora = tiny.lora;
      r.config_source += " (tiny)";
    }
  }
  if (exists(p.w2v_dir + "/config.json")) {
    cfg.wav2vec2 = audio::Wav2Vec2Config::from_json_file(p.w2v_dir + "/config.json");
  }
  if (exists(p.dit_index) || !exists(p.dit_single)) {
    add_component(r, "dit", p.dit_index, dit_layout(cfg.dit), [&] { return load_sharded_safetensors(p.dit_index); });
  } else {
    add_component(r, "dit", p.dit_single, dit_layout(cfg.dit), [&] { return load_safetensors(p.dit_single); });
  }
  add_component(r, "vae", p.vae, vae_layout(cfg.vae), [&] { return load_pth(p.vae); });
  add_component(r, "t5", p.t5, t5_layout(cfg.t5), [&] { return load_pth(p.t5); });
  const std::string w2v_st = p.w2v_dir + "/model.safetensors", w2v_bin = p.w2v_dir + "/pytorch_model.bin";
  bool st = exists(w2v_st) || !exists(w2v_bin);
  add_component(r, "wav2vec2", st ? w2v_st : w2v_bin, wav2vec2_layout(cfg.wav2vec2),
                [&] { return st ? load_safetensors(w2v_st) : load_pth(w2v_bin); });
  add_component(r, "lora", p.lora, lora_layout(cfg.dit, cfg.lora), [&] {
    Checkpoint raw = load_safetensors(p.lora);
    Checkpoint stripped;  // compare without PEFT's "base_model.model." prefix
    const std::string prefix = "base_model.model.";
    for (auto& kv : raw.tensors) {
      std::string k = kv.first.compare(0, prefix.size(), prefix) == 0 ? kv.first.substr(prefix.size()) : kv.first;
      stripped.tensors[k] = kv.second;
      stripped.source[k] = raw.source[kv.first];
    }
    stripped.files = raw.files;
    return stripped;
  });
  return r;
}

void make_tiny_checkpoint(const std::string& dir, const ModelConfig& config, uint64_t seed, int shards) {
  if (shards < 1 || shards > 99999) throw WeightsError("", "shards must be 1..99999");
  at::Generator gen = at::detail::createCPUGenerator(seed);
  const std::string dit_dir = dir + "/" + OfficialFiles::kDitDir;
  const std::string w2v_dir = dir + "/" + OfficialFiles::kWav2Vec2Dir;
  make_dirs(dit_dir);
  make_dirs(w2v_dir);
  make_dirs(dir + "/LiveAvatar");

  // DiT: shards of roughly equal size, in key order, + index + config.json.
  auto dit = random_weights(dit_layout(config.dit), gen);
  uint64_t total = 0;
  for (const auto& kv : dit) total += kv.second.nbytes();
  json weight_map = json::object();
  std::vector<std::map<std::string, at::Tensor>> parts(static_cast<size_t>(shards));
  uint64_t acc = 0;
  for (const auto& kv : dit) {
    size_t i = std::min<size_t>(static_cast<size_t>(acc * shards / std::max<uint64_t>(total, 1)), shards - 1);
    parts[i][kv.first] = kv.second;
    acc += kv.second.nbytes();
  }
  for (int i = 0; i < shards; ++i) {
    std::ostringstream name;
    name << "diffusion_pytorch_model-" << std::setw(5) << std::setfill('0') << i + 1 << "-of-" << std::setw(5)
         << shards << ".safetensors";
    save_safetensors(dit_dir + "/" + name.str(), parts[static_cast<size_t>(i)], {{"format", "pt"}});
    for (const auto& kv : parts[static_cast<size_t>(i)]) weight_map[kv.first] = name.str();
  }
  json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  write_text(dir + "/" + OfficialFiles::kDitIndex, index.dump(2) + "\n");
  std::string cfg = dit::to_config_json(config.dit);
  cfg.insert(cfg.find('{') + 1, "\n  \"liveavatar_tiny\": true,");
  write_text(dir + "/" + OfficialFiles::kDitConfig, cfg);

  save_pth(dir + "/" + OfficialFiles::kVae, random_weights(vae_layout(config.vae), gen));
  save_pth(dir + "/" + OfficialFiles::kT5, random_weights(t5_layout(config.t5), gen));
  const std::string tokenizer_dir = dit_dir + "/google/umt5-xxl";
  make_dirs(tokenizer_dir);
  write_tiny_tokenizer(tokenizer_dir, config.t5.vocab_size);

  save_safetensors(w2v_dir + "/model.safetensors", random_weights(wav2vec2_layout(config.wav2vec2), gen),
                   {{"format", "pt"}});
  write_text(w2v_dir + "/config.json", wav2vec2_config_json(config.wav2vec2));
  write_text(w2v_dir + "/preprocessor_config.json",
             "{\n  \"do_normalize\": true,\n  \"feature_extractor_type\": \"Wav2Vec2FeatureExtractor\",\n"
             "  \"feature_size\": 1,\n  \"padding_side\": \"right\",\n  \"padding_value\": 0.0,\n"
             "  \"return_attention_mask\": true,\n  \"sampling_rate\": 16000\n}\n");
  json vocab = {{"<pad>", 0}, {"<s>", 1}, {"</s>", 2}, {"<unk>", 3}, {"|", 4}};
  for (int64_t i = 5; i < config.wav2vec2.vocab_size; ++i) vocab[std::string(1, static_cast<char>('A' + (i - 5) % 26)) +
                                                                   std::to_string(i)] = i;
  write_text(w2v_dir + "/vocab.json", vocab.dump(2) + "\n");

  save_safetensors(dir + "/" + OfficialFiles::kLora, random_weights(lora_layout(config.dit, config.lora), gen));
}

}  // namespace liveavatar::weights
