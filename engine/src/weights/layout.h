// The published LiveAvatar / Wan2.2-S2V checkpoint set: file names, key names and shapes, derived from the upstream
// module definitions (LiveAvatar @9c2c38d: CausalWanModel_S2V, WanVAE_, T5Encoder (umt5_xxl), HF Wav2Vec2ForCTC,
// PEFT LoRA on q,k,v,o,ffn.0,ffn.2). Used by `liveavatar-checkpoint inspect` to validate and by `make-tiny` to write.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "weights/weights.h"

namespace liveavatar::weights {

/// Mirrors the DiT config.json of Wan2.2-S2V-14B (CausalWanModel_S2V arguments); defaults = the 14B model.
struct DitConfig {
  int64_t dim = 5120;
  int64_t ffn_dim = 13824;
  int64_t num_heads = 40;
  int64_t num_layers = 40;
  int64_t in_dim = 16;
  int64_t out_dim = 16;
  int64_t freq_dim = 256;
  int64_t text_dim = 4096;
  int64_t cond_dim = 16;
  int64_t audio_dim = 1024;          // wav2vec2 hidden size
  int64_t num_audio_token = 4;
  int64_t num_audio_layers = 25;     // CausalAudioEncoder(num_layers=25), hard-coded upstream
  std::vector<int64_t> audio_inject_layers = {0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39};
  bool enable_adain = true;
  std::string adain_mode = "attn_norm";
  bool enable_framepack = true;
  std::vector<int64_t> patch_size = {1, 2, 2};
};

/// WanVAE_ as built by _video_vae (Wan2.1_VAE.pth).
struct VaeConfig {
  int64_t dim = 96;
  int64_t z_dim = 16;
  std::vector<int64_t> dim_mult = {1, 2, 4, 4};
  int64_t num_res_blocks = 2;
  std::vector<bool> temperal_downsample = {false, true, true};
};

/// umt5_xxl(encoder_only=True) (models_t5_umt5-xxl-enc-bf16.pth).
struct T5Config {
  int64_t vocab_size = 256384;
  int64_t dim = 4096;
  int64_t dim_attn = 4096;
  int64_t dim_ffn = 10240;
  int64_t num_heads = 64;
  int64_t num_layers = 24;
  int64_t num_buckets = 32;
};

/// HF Wav2Vec2ForCTC config (wav2vec2-large-xlsr-53-english).
struct Wav2Vec2Config {
  int64_t hidden_size = 1024;
  int64_t num_hidden_layers = 24;
  int64_t num_attention_heads = 16;
  int64_t intermediate_size = 4096;
  std::vector<int64_t> conv_dim = {512, 512, 512, 512, 512, 512, 512};
  std::vector<int64_t> conv_kernel = {10, 3, 3, 3, 3, 2, 2};
  std::vector<int64_t> conv_stride = {5, 2, 2, 2, 2, 2, 2};
  int64_t num_conv_pos_embeddings = 128;
  int64_t num_conv_pos_embedding_groups = 16;
  int64_t vocab_size = 33;
};

struct LoraConfig {
  int64_t rank = 128;
  double alpha = 64.0;
  /// PEFT target_modules: a module is targeted when its name ends with ".<target>".
  std::vector<std::string> targets = {"q", "k", "v", "o", "ffn.0", "ffn.2"};
};

struct ModelConfig {
  DitConfig dit;
  VaeConfig vae;
  T5Config t5;
  Wav2Vec2Config wav2vec2;
  LoraConfig lora;
  /// The tiny instance used by tests and benchmarks (see docs/weights.md).
  static ModelConfig tiny();
};

/// Number of audio injectors upstream builds: AudioInjector_WAN counts (block, inject id) pairs whose names match by
/// substring ('transformer_blocks.{id}' in 'root.transformer_blocks.{i}').
int64_t audio_injector_count(const DitConfig& c);

Layout dit_layout(const DitConfig& c, at::ScalarType dtype = at::kBFloat16);
Layout vae_layout(const VaeConfig& c, at::ScalarType dtype = at::kFloat);
Layout t5_layout(const T5Config& c, at::ScalarType dtype = at::kBFloat16);
Layout wav2vec2_layout(const Wav2Vec2Config& c, at::ScalarType dtype = at::kFloat);
/// LoRA keys (without the PEFT prefix) for every targeted Linear of `dit`.
Layout lora_layout(const DitConfig& dit, const LoraConfig& lora, at::ScalarType dtype = at::kBFloat16);

uint64_t layout_numel(const Layout& layout);

/// config.json texts in the upstream spellings, and back.
std::string dit_config_json(const DitConfig& c);
DitConfig dit_config_from_json(const std::string& text, const std::string& file);
std::string wav2vec2_config_json(const Wav2Vec2Config& c);
Wav2Vec2Config wav2vec2_config_from_json(const std::string& text, const std::string& file);

/// File names of the published set, relative to the checkpoint root.
struct OfficialFiles {
  static constexpr const char* kDitDir = "Wan2.2-S2V-14B";
  static constexpr const char* kDitIndex = "Wan2.2-S2V-14B/diffusion_pytorch_model.safetensors.index.json";
  static constexpr const char* kDitConfig = "Wan2.2-S2V-14B/config.json";
  static constexpr const char* kVae = "Wan2.2-S2V-14B/Wan2.1_VAE.pth";
  static constexpr const char* kT5 = "Wan2.2-S2V-14B/models_t5_umt5-xxl-enc-bf16.pth";
  static constexpr const char* kWav2Vec2Dir = "Wan2.2-S2V-14B/wav2vec2-large-xlsr-53-english";
  static constexpr const char* kLora = "LiveAvatar/liveavatar.safetensors";
};

}  // namespace liveavatar::weights
