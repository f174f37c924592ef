// The causal S2V DiT module tree (CausalWanModel_S2V) and its two streaming entry points: the conditioning-sink
// prefill and the per-block denoising call. SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <functional>

#include <torch/nn/modules/activation.h>

#include "modules.h"
#include "rope.h"

namespace liveavatar::dit {

/// Sink self-attention (prefill): stores the UN-roped k and v in `slot`, attends with q and k roped by `table`.
at::Tensor sink_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                          LayerKV& slot);
at::Tensor sink_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RopeTable& table,
                          LayerKV& slot, AttentionKernel kernel = AttentionKernel::kAuto);

/// The ring window of a block of `seq` tokens at absolute token `current_start` in a ring of `capacity` tokens.
RingWindow ring_window(int64_t current_start, int64_t seq, int64_t capacity);

/// Streaming self-attention: writes k, v roped by `table` at window.start in `ring`; attends to ring rows
/// [0, window.active) followed by the sink's keys roped by `cond_table` and its values.
at::Tensor ring_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& table,
                          const at::Tensor& cond_table, LayerKV& ring, const LayerKV& sink, const RingWindow& window);
at::Tensor ring_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const RopeTable& table,
                          const RopeTable& cond_table, LayerKV& ring, const LayerKV& sink, const RingWindow& window,
                          AttentionKernel kernel = AttentionKernel::kAuto);

/// RoPE groups of the conditioning tokens for reference patches hp x wp and motion latents lh x lw: the empty
/// noisy group and the reference (both roll), then the FramePack 1x, 2x, 4x groups at negative frames.
std::vector<RopeSegment> cond_segments(const ModelConfig& config, int64_t hp, int64_t wp, int64_t lh, int64_t lw);

/// The sinusoidal timestep embedding of upstream (fp64, [cos | sin]) -> [N, dim] fp64.
at::Tensor sinusoidal_embedding(int64_t dim, const at::Tensor& position);

/// What a module tree holds and how its parameters are made.
struct BuildOptions {
  ParamOptions params;         // device, model dtype, FP8 linears
  int64_t first_layer = 0;     // blocks [first_layer, last_layer) and their audio injectors
  int64_t last_layer = -1;     // -1: num_layers
  bool embeddings = true;      // patch / text / time / cond embeddings, audio encoder, FramePack, cond mask
  bool head = true;
};

class CausalWanModelS2VImpl : public torch::nn::Module {
 public:
  /// The whole model, fp32 on the CPU, parameters uninitialised (load or randomize them).
  explicit CausalWanModelS2VImpl(const ModelConfig& config);
  /// The model or shard `options` describe, parameters uninitialised on the options' device.
  CausalWanModelS2VImpl(const ModelConfig& config, const BuildOptions& options);

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
  /// = prepare_sink + text_kv + prefill_layers over all layers.
  void prefill(const at::Tensor& ref, const at::Tensor& motion, const at::Tensor& context_emb, CondCache& cache);

  /// One denoising call: x [C, F, H, W] noisy latents at timestep t, cond_states [cond_dim, F, H, W] (undefined:
  /// zeros), audio [1, layers, audio_dim, 4F]. Writes the block's roped K/V at current_start (tokens, absolute) into
  /// `kv` (a ring) and attends to it plus the sink re-roped with `rope_offset` (upstream relative_dist).
  /// Returns the velocity [C, F, H, W]. = prepare_block + text_kv + run_layers over all layers + apply_head.
  at::Tensor forward_block(const at::Tensor& x, double t, const at::Tensor& context_emb, const at::Tensor& cond_states,
                           const at::Tensor& audio, KVCache& kv, const CondCache& cond, int64_t current_start,
                           int64_t rope_offset);

  // --- The split (each part runs only where its modules are: embeddings, layers [first, last), head) ----------
  /// Cross-attention K/V of the text for layers [first, last) (others left empty), indexed by layer.
  std::vector<LayerKV> text_kv(const at::Tensor& context_emb, int64_t first, int64_t last);
  /// Conditioning tokens, their t = 0 modulation input and RoPE (embeddings).
  SinkInputs prepare_sink(const at::Tensor& ref, const at::Tensor& motion);
  /// The sink through layers [first, last): stores each layer's un-roped K/V in cache.layers[layer].
  void prefill_layers(int64_t first, int64_t last, SinkInputs& in, const std::vector<LayerKV>& text, CondCache& cache);
  /// Patch + cond embedding, time embedding, audio tokens, RoPE tables and ring window of one call (embeddings).
  BlockInputs prepare_block(const at::Tensor& x, double t, const at::Tensor& cond_states, const at::Tensor& audio,
                            const std::vector<RopeSegment>& cond_segments, int64_t current_start, int64_t rope_offset,
                            int64_t ring_capacity);
  /// Layers [first, last) with their audio injectors on in.hidden, writing the block's K/V into `kv`.
  void run_layers(int64_t first, int64_t last, BlockInputs& in, const std::vector<LayerKV>& text, KVCache& kv,
                  const CondCache& cond);
  /// Head + unpatchify -> velocity [C, F, H, W] (head).
  at::Tensor apply_head(const BlockInputs& in);

  /// An empty ring cache for `frame_tokens` tokens per latent frame (the layers this tree holds).
  KVCache make_kv_cache(int64_t frame_tokens, c10::ScalarType dtype = c10::ScalarType::Undefined) const;
  /// Temporal RoPE shift of the reference group for a call at `current_frame` with `rope_offset`.
  int64_t cond_rollout(int64_t current_frame, int64_t rope_offset) const;

  const BuildOptions& build_options() const { return build_; }
  /// Device and model dtype of the parameters.
  at::TensorOptions options() const { return build_.params.tensor; }
  bool holds_layers(int64_t first, int64_t last) const {
    return first >= build_.first_layer && last <= build_.last_layer && first <= last;
  }

  ModelConfig config;
  PatchConv3d patch_embedding{nullptr};
  torch::nn::Sequential text_embedding{nullptr};  // 0 Linear, 1 GELU(tanh), 2 Linear
  torch::nn::Sequential time_embedding{nullptr};  // 0 Linear, 1 SiLU, 2 Linear
  torch::nn::Sequential time_projection{nullptr}; // 0 SiLU, 1 Linear
  IndexedList blocks{nullptr};
  Head head{nullptr};
  PatchConv3d cond_encoder{nullptr};
  AudioEncoder casual_audio_encoder{nullptr};  // sic: the checkpoint's spelling
  AudioInjector audio_injector{nullptr};
  Embedding trainable_cond_mask{nullptr};
  FramePack frame_packer{nullptr};

 private:
  void require_embeddings(const char* what) const;
  void require_layers(int64_t first, int64_t last) const;
  BuildOptions build_;
  std::vector<int64_t> injector_index_;  // layer -> injector index or -1
};
TORCH_MODULE(CausalWanModelS2V);

/// Fills every parameter with seeded random values (normal * 0.02 for weights, small normal for the rest) so that
/// random-weight runs produce non-degenerate outputs. Values are drawn in fp32 on the CPU in registration order.
void randomize_parameters(torch::nn::Module& module, uint64_t seed);

/// The FP8 set of upstream's replace_linear_with_scaled_fp8: every Linear but these (matched by substring).
bool fp8_eligible(const std::string& module_name);

/// Loads `checkpoint` (+ the LoRA pairs of `lora`, merged per tensor) into the parameters of `module` by name:
/// each tensor is read, merged, cast / quantised and copied on its own. Strict: every checkpoint key must name a
/// parameter of the full model of `config` (a shard ignores other shards' keys) and every parameter of `module`
/// must be in the checkpoint with its shape ("X.weight" feeds an FP8 "X.weight_fp8" + "X.weight_scale" and the
/// reverse). On a mismatch nothing is copied and weights::WeightsError lists every problem.
struct StreamLoadOptions {
  const weights::Checkpoint* lora = nullptr;
  weights::LoraOptions lora_options;
  weights::Fp8Scaling fp8_scaling = weights::Fp8Scaling::kPerTensor;
  bool release_pages = false;
  /// Read tensors that view a file mapping with pread (straight into a CPU parameter of the same dtype, else
  /// through one reused host buffer) instead of faulting the mapping in. Only for checkpoints nobody wrote to.
  bool read_files = false;
  /// Called before each tensor is read, with its bytes in the checkpoint (progress); may throw (e.g.
  /// liveavatar::Cancelled) to stop the load.
  std::function<void(uint64_t bytes)> on_tensor;
};
void load_streaming(CausalWanModelS2VImpl& module, const weights::Checkpoint& checkpoint,
                    const StreamLoadOptions& options);

}  // namespace liveavatar::dit
