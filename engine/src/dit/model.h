// The causal S2V DiT module tree (CausalWanModel_S2V) and its two streaming entry points: the conditioning-sink
// prefill and the per-block denoising call. SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <torch/nn/modules/activation.h>

#include "modules.h"
#include "rope.h"

namespace liveavatar::dit {

/// K and V of one layer, [B, S, H, D] in the model dtype.
struct LayerKV {
  at::Tensor k;
  at::Tensor v;
};

/// Per-layer ring cache of the roped keys / values of one denoising step (capacity = clip_frames latent frames).
struct KVCache {
  std::vector<LayerKV> layers;
  int64_t capacity = 0;  // tokens
};

/// The conditioning sink: per-layer UN-roped keys and values of the reference + motion tokens, and the RoPE layout
/// that re-ropes them at each call (reference group shifted by the per-call offset, motion groups fixed).
struct CondCache {
  std::vector<LayerKV> layers;
  std::vector<RopeSegment> segments;
  int64_t tokens = 0;
};

/// Sink self-attention (prefill): stores the UN-roped k and v in `slot`, attends with q and k roped by `table`.
at::Tensor sink_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                          LayerKV& slot);

/// Where a block of `seq` tokens at absolute token `current_start` goes in a ring of `capacity` tokens, and how many
/// ring rows it attends to (upstream: the prefix while filling, the whole ring once wrapped).
struct RingWindow {
  int64_t start = 0;
  int64_t active = 0;
};
RingWindow ring_window(int64_t current_start, int64_t seq, int64_t capacity);

/// Streaming self-attention: writes k, v roped by `table` at window.start in `ring`; attends to ring rows
/// [0, window.active) followed by the sink's keys roped by `cond_table` and its values.
at::Tensor ring_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                          const at::Tensor& cond_table, LayerKV& ring, const LayerKV& sink, const RingWindow& window);

/// RoPE groups of the conditioning tokens for reference patches hp x wp and motion latents lh x lw: the empty
/// noisy group and the reference (both roll), then the FramePack 1x, 2x, 4x groups at negative frames.
std::vector<RopeSegment> cond_segments(const ModelConfig& config, int64_t hp, int64_t wp, int64_t lh, int64_t lw);

/// The sinusoidal timestep embedding of upstream (fp64, [cos | sin]) -> [N, dim] fp64.
at::Tensor sinusoidal_embedding(int64_t dim, const at::Tensor& position);

class CausalWanModelS2VImpl : public torch::nn::Module {
 public:
  explicit CausalWanModelS2VImpl(const ModelConfig& config);

  /// context [L <= text_len, text_dim] -> zero-padded to text_len -> [1, text_len, dim].
  at::Tensor embed_text(const at::Tensor& context);
  /// t [F] -> {e [F, dim] fp32 (time_embedding), e0 [1, F, 6, 2, dim] fp32 (slot 1 = the t = 0 row)}.
  std::pair<at::Tensor, at::Tensor> embed_time(const at::Tensor& t);
  /// audio [1, layers, audio_dim, T] -> {global [1, F, 1, dim], local [1, F, tokens + 1, dim]}: the front padded
  /// with motion_frames copies of frame 0, encoded, the first lat_motion_frames frames dropped.
  std::pair<at::Tensor, at::Tensor> encode_audio(const at::Tensor& audio);
  /// Conditioning tokens [1, Lc, dim] (reference + FramePack motion, + trainable_cond_mask) and their RoPE layout.
  std::pair<at::Tensor, std::vector<RopeSegment>> cond_tokens(const at::Tensor& ref, const at::Tensor& motion);

  /// The sink forward: ref [C, 1, H, W], motion [C, T, H, W], context_emb [1, text_len, dim] -> fills `cache` with
  /// every layer's un-roped K/V of the conditioning tokens. No audio, no head.
  void prefill(const at::Tensor& ref, const at::Tensor& motion, const at::Tensor& context_emb, CondCache& cache);

  /// One denoising call: x [C, F, H, W] noisy latents at timestep t, cond_states [cond_dim, F, H, W] (undefined:
  /// zeros), audio [1, layers, audio_dim, 4F]. Writes the block's roped K/V at current_start (tokens, absolute) into
  /// `kv` (a ring) and attends to it plus the sink re-roped with `rope_offset` (upstream relative_dist).
  /// Returns the velocity [C, F, H, W].
  at::Tensor forward_block(const at::Tensor& x, double t, const at::Tensor& context_emb, const at::Tensor& cond_states,
                           const at::Tensor& audio, KVCache& kv, const CondCache& cond, int64_t current_start,
                           int64_t rope_offset);

  /// An empty ring cache for `frame_tokens` tokens per latent frame.
  KVCache make_kv_cache(int64_t frame_tokens) const;
  /// Temporal RoPE shift of the reference group for a call at `current_frame` with `rope_offset`.
  int64_t cond_rollout(int64_t current_frame, int64_t rope_offset) const;

  ModelConfig config;
  torch::nn::Conv3d patch_embedding{nullptr};
  torch::nn::Sequential text_embedding{nullptr};  // 0 Linear, 1 GELU(tanh), 2 Linear
  torch::nn::Sequential time_embedding{nullptr};  // 0 Linear, 1 SiLU, 2 Linear
  torch::nn::Sequential time_projection{nullptr}; // 0 SiLU, 1 Linear
  torch::nn::ModuleList blocks{nullptr};
  Head head{nullptr};
  torch::nn::Conv3d cond_encoder{nullptr};
  AudioEncoder casual_audio_encoder{nullptr};  // sic: the checkpoint's spelling
  AudioInjector audio_injector{nullptr};
  torch::nn::Embedding trainable_cond_mask{nullptr};
  FramePack frame_packer{nullptr};

 private:
  std::vector<int64_t> injector_index_;  // layer -> injector index or -1
};
TORCH_MODULE(CausalWanModelS2V);

/// Fills every parameter with seeded random values (normal * 0.02 for weights, small normal for the rest) so that
/// random-weight runs produce non-degenerate outputs.
void randomize_parameters(torch::nn::Module& module, uint64_t seed);

}  // namespace liveavatar::dit
