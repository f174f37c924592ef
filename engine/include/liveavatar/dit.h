// gst-liveavatar DiT: the causal audio-driven diffusion transformer of LiveAvatar (Wan2.2-S2V-14B + streaming),
// ported to LibTorch. SPDX-License-Identifier: LGPL-2.1-or-later
//
//   auto config = dit::ModelConfig{};                         // 14B defaults; ModelConfig::tiny() for tests
//   dit::Model model(config, torch::kCUDA, torch::kBFloat16);
//   model.load(weights::load_sharded_safetensors(index));    // strict: every key by its checkpoint name
//   dit::Session session(model, {.seed = 42});
//   session.set_condition(ref_latent, motion_latents, text_context);   // prefills the conditioning sink once
//   for (;;) velocity_free_latents = session.generate_block(audio_features);   // 3 latent frames per call
//
// Thread-safety: a Model is immutable after load() and may be shared by several Sessions, each used from one thread
// at a time (a Session owns its KV caches, RNG and position). Module-level entry points live in the internal header
// engine/src/dit/model.h (used by the tool liveavatar-run-module and the golden tests).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "liveavatar/engine.h"  // liveavatar::Error

namespace liveavatar::weights {
struct Checkpoint;
}

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
  /// Reads the fields present in an upstream config.json (diffusers format); absent fields keep their defaults.
  static ModelConfig from_json_file(const std::string& path);

  /// Throws DitError naming the first inconsistent field and the constraint.
  void validate() const;
  int64_t head_dim() const { return dim / num_heads; }
  int64_t lat_motion_frames() const { return (motion_frames + 3) / 4; }
  int64_t audio_frames_per_block() const { return frames_per_block * 4; }
  /// Parameters of the model this config builds (exact, without building it).
  uint64_t parameter_count() const;
};

/// The flow-matching schedule as diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps) computes it:
/// timesteps [steps] and sigmas [steps + 1] (last 0), float32.
struct Schedule {
  at::Tensor timesteps;
  at::Tensor sigmas;
};
Schedule make_schedule(const ModelConfig& config);
/// One Euler step: (x.float() + (sigma_next - sigma) * velocity).to(velocity.dtype()).
at::Tensor euler_step(const at::Tensor& x, const at::Tensor& velocity, const Schedule& schedule, int64_t step);

class CausalWanModelS2V;  // the module tree (engine/src/dit/model.h)

/// Immutable weights of the DiT on one device (`single` plan).
class Model {
 public:
  /// Builds the module tree with seeded random weights (for benches; load() replaces them).
  Model(const ModelConfig& config, c10::Device device = c10::kCPU, c10::ScalarType dtype = c10::kFloat,
        uint64_t seed = 0);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  /// Strict load by checkpoint key (missing / unexpected / wrong shape -> weights::WeightsError); casts dtype.
  void load(const weights::Checkpoint& checkpoint);

  const ModelConfig& config() const { return config_; }
  c10::Device device() const { return device_; }
  c10::ScalarType dtype() const { return dtype_; }
  CausalWanModelS2V& module() const;
  uint64_t parameter_count() const;

 private:
  ModelConfig config_;
  c10::Device device_;
  c10::ScalarType dtype_;
  std::shared_ptr<CausalWanModelS2V> module_;
};

struct SessionOptions {
  /// Noise seed: clip r draws its noise [16, clip_frames, H, W] from a CPU generator seeded with seed + r.
  uint64_t seed = 0;
  /// Seed of the per-call reference RoPE offset (upstream: unseeded random.randint(4, 30)).
  uint64_t rope_seed = 0;
  /// Recorded offsets, one per DiT call in order (block-major, then step); used before drawing from rope_seed.
  std::vector<int64_t> rope_offsets;
  /// Rolling sink: after clip 0, replace the reference by the first generated latent frame and re-prefill.
  bool roll_sink = true;
};

struct BlockResult {
  at::Tensor latents;                  // [C, frames_per_block, H, W] denoised latents
  std::vector<int64_t> rope_offsets;   // the offsets used, one per step
  std::vector<at::Tensor> velocities;  // the DiT output of each step, [C, frames_per_block, H, W]
};

/// One stream: caches, position, noise. Single plan: one device holds the weights and the four KV caches.
class Session {
 public:
  Session(const Model& model, SessionOptions options = {});
  ~Session();
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  /// ref_latent [C,1,H,W], motion_latents [C,T<=19,H,W], text_context [L<=text_len, text_dim]; prefills the sink.
  void set_condition(const at::Tensor& ref_latent, const at::Tensor& motion_latents, const at::Tensor& text_context);
  /// Optional motion latents for the sink refresh after clip 0 (upstream re-encodes the decoded video); default:
  /// keep the previous ones.
  void set_refresh_motion(const at::Tensor& motion_latents);
  /// audio [audio_layers, audio_dim, 4 * frames_per_block] wav2vec2 states; noise [C, frames, H, W] overrides the
  /// seeded noise of this block.
  BlockResult generate_block(const at::Tensor& audio, const std::optional<at::Tensor>& noise = std::nullopt);
  int64_t blocks_done() const;

 private:
  struct State;
  const Model& model_;
  SessionOptions options_;
  std::unique_ptr<State> state_;
};

}  // namespace liveavatar::dit
