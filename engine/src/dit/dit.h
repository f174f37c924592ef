// gst-liveavatar DiT: the causal audio-driven diffusion transformer of LiveAvatar (Wan2.2-S2V-14B + streaming),
// ported to LibTorch. SPDX-License-Identifier: LGPL-2.1-or-later
//
//   auto config = dit::ModelConfig::from_json_file(dir + "/config.json");   // ModelConfig::tiny() for tests
//   dit::LoadOptions lo;
//   lo.device = c10::Device(c10::kCUDA, 0);
//   lo.precision = dit::Precision::kFp8;                      // fp32 | bf16 | fp8 (e4m3 weights + scale)
//   lo.lora = root + "/LiveAvatar/liveavatar.safetensors";    // merged tensor by tensor while loading
//   dit::Model model(config, dir, lo);   // dir: *.safetensors.index.json, one .safetensors, or a folder with one
//   dit::Session session(model, {});
//   session.set_condition(ref_latent, motion_latents, text_context);   // prefills the conditioning sink once
//   for (;;) latents = session.generate_block(audio_features).latents;   // 3 latent frames per call
//
// A shard (the `stage` plan) is the same Model built with a layer range; it holds only blocks [first, last), their
// audio injectors, and the embeddings (first == 0) / head (last == num_layers):
//   lo.first_layer = 0;  lo.last_layer = 20;  dit::Model a(config, dir, lo);   // embeddings + blocks 0..19
//   lo.first_layer = 20; lo.last_layer = 40;  dit::Model b(config, dir, lo);   // blocks 20..39 + head
//   dit::Session session({&a, &b}, {});        // in one process; across processes use the stage API below:
//   auto sa = a.new_state(frame_tokens), sb = b.new_state(frame_tokens);
//   auto ctx = a.embed_text(text);  a.set_text(ctx, sa);  b.set_text(ctx, sb);
//   auto sink = a.prepare_sink(ref, motion);  a.prefill(sink, sa);  b.prefill(sink, sb);   // sink.hidden travels
//   auto in = a.prepare(x, t, audio, sink.segments, current_start, rope_offset, sa.rings[0].capacity);
//   a.run_layers(in, sa, step);  b.run_layers(in, sb, step);   // in.hidden travels from a to b
//   auto velocity = b.head(in);
//
// Loading builds every parameter uninitialised directly on the device in its final dtype, then reads the tensors
// one at a time from the files (pread straight into a CPU parameter of the same dtype, else through one reused host
// buffer; LoRA merged and FP8 quantised per tensor), so host memory stays near the largest tensor. The name check is strict over the whole checkpoint:
// a key that belongs to no layer of the model, or a key of this shard that is missing or mis-shaped, fails.
//
// Thread-safety: a Model is immutable after construction and may be shared by several Sessions, each used from one
// thread at a time (a Session owns its KV caches, RNG and position); Models (shards) may be built concurrently.
// Module-level entry points live in the internal header engine/src/dit/model.h (used by the tool
// liveavatar-run-module and the golden tests).
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

#include <functional>

#include "dit/config.h"          // ModelConfig, DitError
#include "liveavatar/engine.h"   // liveavatar::Error, liveavatar::Cancelled
#include "weights/weights.h"  // Checkpoint, LoraOptions, Fp8Scaling

namespace liveavatar::dit {

/// The flow-matching schedule as diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps) computes it:
/// timesteps [steps] and sigmas [steps + 1] (last 0), float32.
struct Schedule {
  at::Tensor timesteps;
  at::Tensor sigmas;
};
Schedule make_schedule(const ModelConfig& config);
/// One Euler step: (x.float() + (sigma_next - sigma) * velocity).to(velocity.dtype()).
at::Tensor euler_step(const at::Tensor& x, const at::Tensor& velocity, const Schedule& schedule, int64_t step);

// ---------------------------------------------------------------------------------------------------------------
// Per-layer state and per-call inputs (explicit, so a stage of the layer pipeline can own and send them)
// ---------------------------------------------------------------------------------------------------------------

/// K and V of one layer, [B, S, H, D] in the model dtype.
struct LayerKV {
  at::Tensor k;
  at::Tensor v;
};

/// Per-layer ring cache of the roped keys / values of one denoising step (capacity = clip_frames latent frames).
/// `layers` is indexed by global layer; a shard fills only its own. The tensors are in the stream's KV dtype
/// (SessionOptions::kv_dtype: the model dtype, or fp32 / bf16 / float8_e4m3fn to store them narrower or wider);
/// attention reads them back in the model dtype. FP8 stores saturate at +-448 (e4m3's largest finite value).
struct KVCache {
  std::vector<LayerKV> layers;
  int64_t capacity = 0;  // tokens
};

/// One grid group of upstream's rope_precompute: start (f0, h0, w0), end (f1, h1, w1) and the range (tf, th, tw)
/// that the (f1 - f0) x (h1 - h0) x (w1 - w0) tokens are spread over (np.linspace, truncated). A negative start frame
/// means negative temporal positions (motion frames, upstream: conjugated table rows).
struct RopeSegment {
  int64_t f0 = 0, h0 = 0, w0 = 0;
  int64_t f1 = 0, h1 = 0, w1 = 0;
  int64_t tf = 0, th = 0, tw = 0;
  /// upstream rollout_grid_sizes shifts only the first two groups (noisy, reference), never the motion ones.
  bool rolls = false;
};

/// The conditioning sink: per-layer UN-roped keys and values of the reference + motion tokens, and the RoPE layout
/// that re-ropes them at each call (reference group shifted by the per-call offset, motion groups fixed).
struct CondCache {
  std::vector<LayerKV> layers;
  std::vector<RopeSegment> segments;
  int64_t tokens = 0;
  c10::ScalarType dtype = c10::ScalarType::Undefined;  // storage of `layers` (Undefined: the model dtype)
};

/// `x` as KV storage of `dtype` (Undefined: x itself): float8_e4m3fn saturates at +-448 first (a plain cast would
/// turn a larger value into NaN).
at::Tensor to_kv_storage(const at::Tensor& x, c10::ScalarType dtype);

/// Where a block of `seq` tokens at absolute token `current_start` goes in a ring of `capacity` tokens, and how many
/// ring rows it attends to (upstream: the prefix while filling, the whole ring once wrapped).
struct RingWindow {
  int64_t start = 0;
  int64_t active = 0;
};

/// The CUDA graph key of one shard's forward at denoising step `step` over ring window `window`: the shapes and the
/// ring slots its kernels read, which is all that differs between the captured forwards of a stream.
inline uint64_t graph_key(int64_t step, const RingWindow& window) {
  return (static_cast<uint64_t>(step) << 56) ^ (static_cast<uint64_t>(window.start) << 28) ^
         static_cast<uint64_t>(window.active);
}

/// A RoPE rotation as the kernels apply it: cos and sin [L, 1, D / 2] fp32. Upstream's tables are complex32, so
/// fp32 holds every value exactly.
struct RopeTable {
  at::Tensor cos;
  at::Tensor sin;
};

/// Everything one stream keeps for the layers a Model holds; vectors are indexed by global layer.
struct StreamState {
  CondCache sink;              // un-roped K/V of the conditioning tokens (one copy for all steps)
  std::vector<LayerKV> text;   // cross-attention K/V of the text context (once per stream)
  std::vector<KVCache> rings;  // one per denoising step
};

/// The conditioning tokens on their way through the layers (prefill). `hidden` travels between shards.
struct SinkInputs {
  at::Tensor hidden;                  // [1, Lc, dim] model dtype
  at::Tensor e0;                      // [1, F, 6, 2, dim] fp32 (t = 0)
  RopeTable rope;                     // [Lc, 1, D / 2]
  std::vector<RopeSegment> segments;  // RoPE layout, kept by every shard's StreamState for the re-roping
};

/// One denoising call on its way through the layers. `hidden` is the only large tensor (~32 MB bf16 at 704x384)
/// and travels between shards; the rest is per call and small.
struct BlockInputs {
  at::Tensor hidden;        // [1, L, dim] model dtype
  at::Tensor e;             // [F, dim] fp32 time embedding (head)
  at::Tensor e0;            // [1, F, 6, 2, dim] fp32 time projection (layer modulation)
  at::Tensor audio_global;  // [1, F, 1, dim] (AdaLN of the audio injectors; undefined without enable_adain)
  at::Tensor audio_local;   // [1, F, tokens + 1, dim]
  RopeTable rope;           // the block's tokens at their absolute frames [L, 1, D / 2]
  RopeTable cond_rope;      // the sink's keys for this call (reference shifted by the offset) [Lc, 1, D / 2]
  RingWindow window;        // where the block's K/V go in the ring, how many ring rows it attends to
  int64_t frames = 0, hp = 0, wp = 0;  // latent frames and token grid of the block
};

// ---------------------------------------------------------------------------------------------------------------
// Model (weights) and Session (one stream)
// ---------------------------------------------------------------------------------------------------------------

/// Precision of the weights a Model holds.
enum class Precision {
  kFp32,  // everything fp32
  kBf16,  // bf16, except what upstream runs under autocast(float32): time embedding / projection, head, audio encoder
  kFp8,   // kBf16 with the Linear weights (upstream's FP8 set: all but text / time embeddings, time projection,
          // head, audio final_linear) as float8_e4m3fn + fp32 scale; dequantised to bf16 at run time on CPU
};
/// "fp32" | "bf16" | "fp8" (throws DitError otherwise).
Precision parse_precision(const std::string& name);
/// The dtype of the non-FP8 weights and of the activations.
c10::ScalarType precision_dtype(Precision precision);

/// The attention kernel (LibTorch's scaled-dot-product backends, called by name). kAuto: LibTorch's own choice on
/// CUDA (flash, efficient, math, cuDNN) and the CPU flash kernel on the CPU; the others pin one backend on CUDA (a
/// backend that refuses the shapes throws). docs/benchmarks.md has the measured speed of each at the model's shapes.
enum class AttentionKernel { kAuto, kFlash, kEfficient, kCudnn, kMath };
/// "auto" | "flash" | "efficient" | "cudnn" | "math" (throws DitError otherwise).
AttentionKernel parse_attention_kernel(const std::string& name);
const char* attention_kernel_name(AttentionKernel kernel);

/// How the FP8 Linear layers compute. kScaledMm: activations quantised per call (per tensor, or per row when the
/// weight scales are per channel) and one at::_scaled_mm with the static weight scales, bf16 out (upstream's FP8
/// path). kDequantize: the weight dequantised to bf16 and an ordinary matmul. kAuto: kScaledMm on GPUs with FP8
/// tensor cores (sm_89+), kDequantize elsewhere.
enum class Fp8Compute { kAuto, kScaledMm, kDequantize };

struct LoadOptions {
  c10::Device device = c10::kCPU;
  Precision precision = Precision::kBf16;
  AttentionKernel attention = AttentionKernel::kAuto;
  Fp8Compute fp8_compute = Fp8Compute::kAuto;
  /// Layers [first_layer, last_layer) (-1: num_layers), with their audio injectors.
  int64_t first_layer = 0;
  int64_t last_layer = -1;
  /// Patch / text / time / cond embeddings, audio encoder, FramePack (default: first_layer == 0).
  std::optional<bool> embeddings;
  /// The output head (default: last_layer == num_layers).
  std::optional<bool> head;
  /// A PEFT LoRA .safetensors merged tensor by tensor on load ("": none), with its alpha / rank.
  std::string lora;
  weights::LoraOptions lora_options;
  /// FP8 scale layout when quantising on load (a pre-converted checkpoint brings its own; it must match).
  weights::Fp8Scaling fp8_scaling = weights::Fp8Scaling::kPerTensor;
  /// Drop each source tensor's mapped file pages once copied, when the tensors are read through the mapping (a
  /// Checkpoint passed in); a path is read with pread and never maps them.
  bool release_pages = true;
  /// Called before each tensor is read, with its bytes in the checkpoint (load progress); may throw (e.g.
  /// liveavatar::Cancelled) to stop the load, which leaves the model unusable.
  std::function<void(uint64_t bytes)> on_tensor;
};

class CausalWanModelS2V;  // the module tree (engine/src/dit/model.h)

/// Immutable weights of the DiT, or of a shard of it, on one device.
class Model {
 public:
  /// Builds the whole module tree with seeded random weights (for benches and tests; load() replaces them).
  Model(const ModelConfig& config, c10::Device device = c10::kCPU, c10::ScalarType dtype = c10::kFloat,
        uint64_t seed = 0);
  /// Builds the model or shard that `options` describe directly on its device and dtype and loads it from
  /// `dit_path`: a *.safetensors.index.json, one .safetensors, or a folder holding one of them. No random values are
  /// drawn. Throws weights::WeightsError (names, shapes, files) or DitError (options).
  Model(const ModelConfig& config, const std::string& dit_path, const LoadOptions& options);
  /// The same from a checkpoint already opened (its tensors may view file mappings or live in memory).
  Model(const ModelConfig& config, const weights::Checkpoint& checkpoint, const LoadOptions& options);
  /// The model or shard `options` describe with random weights drawn on its device from `seed` (benches: no
  /// checkpoint, no host copy of the weights); FP8 weights are quantised from the draws. LoRA options are ignored.
  Model(const ModelConfig& config, const LoadOptions& options, uint64_t seed);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  /// Strict load by checkpoint key into the existing weights (missing / unexpected / wrong shape ->
  /// weights::WeightsError, nothing changed); casts dtype, quantises FP8 weights.
  void load(const weights::Checkpoint& checkpoint);

  const ModelConfig& config() const { return config_; }
  c10::Device device() const { return device_; }
  /// The dtype of the activations and the non-FP8 weights.
  c10::ScalarType dtype() const { return dtype_; }
  Precision precision() const { return precision_; }
  int64_t first_layer() const { return first_layer_; }
  int64_t last_layer() const { return last_layer_; }
  bool has_embeddings() const { return embeddings_; }
  bool has_head() const { return head_; }
  CausalWanModelS2V& module() const;
  uint64_t parameter_count() const;
  /// Bytes of all parameters (FP8 weights count one byte per element).
  uint64_t parameter_bytes() const;

  // --- Stage API: one call = prepare (first shard) -> run_layers (each shard, in layer order) -> head (last) -----
  /// text [L <= text_len, text_dim] -> [1, text_len, dim] (embeddings).
  at::Tensor embed_text(const at::Tensor& text) const;
  /// An empty state for this model's layers, rings sized for `frame_tokens` tokens per latent frame, KV stored in
  /// `kv_dtype` (Undefined: the model dtype; see SessionOptions::kv_dtype).
  StreamState new_state(int64_t frame_tokens, c10::ScalarType kv_dtype = c10::ScalarType::Undefined) const;
  /// Caches the text cross-attention K/V of this model's layers (once per stream).
  void set_text(const at::Tensor& context_emb, StreamState& state) const;
  /// ref [C, 1, H, W], motion [C, T <= 19, H, W] -> the conditioning tokens (embeddings).
  SinkInputs prepare_sink(const at::Tensor& ref, const at::Tensor& motion) const;
  /// Runs the sink through layers [first, last) (default: all this model holds), storing their un-roped K/V.
  void prefill(SinkInputs& in, StreamState& state, int64_t first = -1, int64_t last = -1) const;
  /// x [C, F, H, W] noisy latents at timestep t, audio [1, audio_layers, audio_dim, 4F] (embeddings).
  /// `cond_segments` is the sink's RoPE layout (SinkInputs::segments), `ring_capacity` the rings' (tokens).
  BlockInputs prepare(const at::Tensor& x, double t, const at::Tensor& audio,
                      const std::vector<RopeSegment>& cond_segments, int64_t current_start, int64_t rope_offset,
                      int64_t ring_capacity, const at::Tensor& cond_states = at::Tensor()) const;
  /// Runs layers [first, last) (default: all this model holds) on in.hidden with the KV ring of denoising `step`.
  void run_layers(BlockInputs& in, StreamState& state, int64_t step, int64_t first = -1, int64_t last = -1) const;
  /// The velocity [C, F, H, W] from the hidden state after the last layer (head).
  at::Tensor head(const BlockInputs& in) const;

 private:
  void build(const weights::Checkpoint* checkpoint, const LoadOptions& options, bool own_checkpoint);
  void require(bool what, const char* part) const;
  ModelConfig config_;
  c10::Device device_;
  c10::ScalarType dtype_;
  Precision precision_ = Precision::kFp32;
  int64_t first_layer_ = 0, last_layer_ = 0;
  bool embeddings_ = true, head_ = true;
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
  /// Replay each shard's per-step forward as a CUDA graph keyed by (step, ring slot) when the shard is on a GPU
  /// (captured on the second call of a key; eager if capture fails, see Session::graph_status()).
  bool cuda_graphs = false;
  /// Storage of the KV rings and the sink's K/V: Undefined = the model dtype; kFloat, kBFloat16 or
  /// kFloat8_e4m3fn (half of bf16's bytes; attention converts back to the model dtype as it reads).
  c10::ScalarType kv_dtype = c10::ScalarType::Undefined;
  /// Asked between denoising steps and between shards; returning true stops generate_block / set_condition with
  /// liveavatar::Cancelled (the block is lost, the session stays usable from its last complete block).
  std::function<bool()> cancelled;
};

/// The reference RoPE offset of DiT call `call` of a stream (block-major, then step): the recorded one while there
/// are any, else drawn from options.rope_seed and the call index (splitmix64) in [rope_offset_min, rope_offset_max].
/// Session and every parallel plan draw through this, so their streams match call for call.
int64_t rope_offset_of_call(const ModelConfig& config, const SessionOptions& options, int64_t call);

struct BlockResult {
  at::Tensor latents;                  // [C, frames_per_block, H, W] denoised latents
  std::vector<int64_t> steps;          // the schedule's steps that were run (all of them unless set_steps lowered it)
  std::vector<int64_t> rope_offsets;   // the offsets used, one per step
  std::vector<at::Tensor> velocities;  // the DiT output of each step, [C, frames_per_block, H, W]
};

/// One stream: caches, position, noise. Single plan: one Model holds the weights and the four KV caches; or a chain
/// of shards in one process, each holding its layers' caches, the hidden state passed from one to the next.
class Session {
 public:
  Session(const Model& model, SessionOptions options = {});
  /// Shards in layer order that together hold layers [0, num_layers) once each, the first with the embeddings and
  /// the last with the head (they may live on different devices). Throws DitError otherwise.
  Session(std::vector<const Model*> shards, SessionOptions options = {});
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
  /// CUDA graphs in use: "off", "eager: <why>" or "<n> graphs, <m> replays".
  std::string graph_status() const;
  /// Denoising steps of the next blocks, 1 .. sampling_steps (default: all). Fewer steps run a subset of the
  /// schedule: the first step (the only one that starts from pure noise) and the last steps - 1, each Euler step
  /// going straight to the next step that is run. The KV rings of the skipped steps get this block's keys and
  /// values from the ring of the run step nearest in noise level, so later blocks at any step count attend to
  /// every earlier block at its position. Throws DitError outside 1 .. sampling_steps.
  void set_steps(int64_t steps);
  int64_t steps() const;
  /// The schedule's step indices that `steps` denoising steps run (see set_steps).
  static std::vector<int64_t> step_subset(int64_t sampling_steps, int64_t steps);

 private:
  struct State;
  void check_cancelled() const;
  void prefill_sink(const at::Tensor& ref, const at::Tensor& motion);
  std::vector<const Model*> shards_;
  SessionOptions options_;
  std::unique_ptr<State> state_;
};

}  // namespace liveavatar::dit
