// The DiT's configuration: the shape of CausalWanModel_S2V (config.json) and the streaming settings, its reading,
// validation and exact parameter count. Plain C++ (no LibTorch): the one DiT config type of the project, used by
// the DiT, the checkpoint layout (make-tiny, inspect) and the memory planner. SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "liveavatar/engine.h"  // liveavatar::Error

namespace liveavatar::dit {

/// A DiT configuration or input that cannot work. what() says which value and what would.
class DitError : public Error {
 public:
  using Error::Error;
};

/// The model shape. Defaults are Wan2.2-S2V-14B as LiveAvatar runs it; each field names the upstream argument of
/// CausalWanModel_S2V (config.json) or pipeline setting (wan_s2v_14B_modified.py) it mirrors.
struct ModelConfig {
  int64_t dim = 5120;          // dim
  int64_t ffn_dim = 13824;     // ffn_dim
  int64_t num_heads = 40;      // num_heads
  int64_t num_layers = 40;     // num_layers
  int64_t in_dim = 16;         // in_dim (latent channels)
  int64_t out_dim = 16;        // out_dim
  int64_t cond_dim = 16;       // cond_dim (pose latents; zeros without a pose video)
  int64_t text_dim = 4096;     // text_dim (umT5-XXL width)
  int64_t text_len = 512;      // text_len (context padded with zeros to this length)
  int64_t freq_dim = 256;      // freq_dim (sinusoidal timestep width)
  int64_t audio_dim = 1024;    // audio_dim (wav2vec2-large hidden width)
  int64_t audio_layers = 25;   // CausalAudioEncoder num_layers (hard-coded 25 upstream: all wav2vec2 hidden states)
  int64_t num_audio_token = 4; // num_audio_token
  std::array<int64_t, 3> patch_size{1, 2, 2};  // patch_size
  std::vector<int64_t> audio_inject_layers{0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39};  // audio_inject_layers
  bool enable_adain = true;                  // enable_adain
  std::string adain_mode = "attn_norm";      // adain_mode ("attn_norm": AdaLN on the hidden states before injection)
  std::array<int64_t, 3> framepack_buckets{1, 2, 16};  // FramePackMotioner zip_frame_buckets
  double eps = 1e-6;                         // eps
  double adain_eps = 1e-5;                   // diffusers AdaLayerNorm norm_eps default
  // Streaming (pipeline) settings.
  int64_t motion_frames = 73;       // s2v_14B.motion_frames (video frames; (73 + 3) / 4 = 19 latent frames)
  int64_t frames_per_block = 3;     // s2v_14B.num_frames_per_block (latent frames per block)
  int64_t clip_frames = 12;         // latent frames per clip = KV ring size ((infer_frames 48 + 3 + 73) / 4 - 19)
  int64_t ref_rope_frame = 30;      // temporal RoPE index of the reference frame (ref_grid_sizes 30..31)
  int64_t rope_offset_min = 4;      // random.randint(4, 30) in _forward_inference
  int64_t rope_offset_max = 30;
  int64_t num_train_timesteps = 1000;  // FlowMatchEulerDiscreteScheduler(num_train_timesteps)
  double shift = 3.0;                  // FlowMatchEulerDiscreteScheduler(shift=3)
  int64_t sampling_steps = 4;          // sampling steps = denoising steps per block

  /// The tiny configuration the golden fixtures use (same shape family, CPU-sized).
  static ModelConfig tiny();
  /// About 0.5 G parameters: the 14B's structure at a twelfth of its width and depth (the benches' middle size).
  static ModelConfig medium();
  /// Reads the fields present in an upstream config.json (diffusers format); absent fields keep their defaults.
  static ModelConfig from_json_file(const std::string& path);
  /// The same from the text of a config.json (`path` names it in errors).
  static ModelConfig from_json_text(const std::string& text, const std::string& path);

  /// Throws DitError naming the first inconsistent field and the constraint.
  void validate() const;
  int64_t head_dim() const { return dim / num_heads; }
  int64_t lat_motion_frames() const { return (motion_frames + 3) / 4; }
  int64_t audio_frames_per_block() const { return frames_per_block * 4; }
  /// Parameters of the model this config builds (exact, without building it).
  uint64_t parameter_count() const;
};

/// The config.json text of `config` in the upstream (diffusers) spelling; from_json_file() reads it back.
std::string to_config_json(const ModelConfig& config);

}  // namespace liveavatar::dit
