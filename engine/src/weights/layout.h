// The published LiveAvatar / Wan2.2-S2V checkpoint set: file names, key names and shapes, derived from the upstream
// module definitions (LiveAvatar @9c2c38d: CausalWanModel_S2V, WanVAE_, T5Encoder (umt5_xxl), HF Wav2Vec2ForCTC,
// PEFT LoRA on q,k,v,o,ffn.0,ffn.2). Used by `liveavatar-checkpoint inspect` to validate and by `make-tiny` to write.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "audio/audio_encoder.h"
#include "dit/config.h"
#include "text/text_encoder.h"
#include "vae/vae.h"
#include "weights/weights.h"

namespace liveavatar::weights {

/// The whole set, each part in its component's own config type.
struct ModelConfig {
  dit::ModelConfig dit;          // Wan2.2-S2V-14B config.json
  vae::VaeConfig vae;            // WanVAE_ as built by _video_vae (Wan2.1_VAE.pth)
  text::T5Config t5;             // umt5_xxl(encoder_only=True) (models_t5_umt5-xxl-enc-bf16.pth)
  audio::Wav2Vec2Config wav2vec2;  // HF Wav2Vec2ForCTC config (wav2vec2-large-xlsr-53-english)
  LoraOptions lora;              // the LiveAvatar LoRA (r 128, alpha 64, PEFT targets)
  /// The tiny instance used by tests and benchmarks (see docs/weights.md).
  static ModelConfig tiny();
};

/// Number of audio injectors upstream builds: AudioInjector_WAN counts (block, inject id) pairs whose names match by
/// substring ('transformer_blocks.{id}' in 'root.transformer_blocks.{i}').
int64_t audio_injector_count(const dit::ModelConfig& c);

Layout dit_layout(const dit::ModelConfig& c, at::ScalarType dtype = at::kBFloat16);
Layout vae_layout(const vae::VaeConfig& c, at::ScalarType dtype = at::kFloat);
Layout t5_layout(const text::T5Config& c, at::ScalarType dtype = at::kBFloat16);
Layout wav2vec2_layout(const audio::Wav2Vec2Config& c, at::ScalarType dtype = at::kFloat);
/// LoRA keys (without the PEFT prefix) for every targeted Linear of `dit`.
Layout lora_layout(const dit::ModelConfig& dit, const LoraOptions& lora, at::ScalarType dtype = at::kBFloat16);

uint64_t layout_numel(const Layout& layout);

/// config.json texts in the upstream spellings, and back.
/// (The DiT's: dit::to_config_json and dit::ModelConfig::from_json_text.)
/// wav2vec2's config.json in the HF spelling (read back by audio::Wav2Vec2Config::from_json_file).
std::string wav2vec2_config_json(const audio::Wav2Vec2Config& c);

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
