// Model (weights on one device) and Session (the `single` streaming plan: 4 KV rings, one sink, seeded noise),
// plus the flow-matching Euler schedule. SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/CPUGeneratorImpl.h>
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <mutex>
#include <optional>

#include "cuda/cuda.h"
#include "weights/weights.h"
#include "model.h"

namespace liveavatar::dit {

// ---------------------------------------------------------------------------------------------------------------
// Schedule: diffusers FlowMatchEulerDiscreteScheduler(num_train_timesteps, shift).set_timesteps(steps)
// ---------------------------------------------------------------------------------------------------------------
Schedule make_schedule(const ModelConfig& config) {
  const auto n_train = config.num_train_timesteps;
  const double shift = config.shift;
  // __init__: sigma range from float32 tensors (train timesteps 1..N, shifted).
  auto shifted_f32 = [&](double timestep) {
    const auto s = at::full({1}, static_cast<float>(timestep), at::kFloat) / n_train;
    return (s * shift / (s * (shift - 1) + 1)).item<float>();
  };
  const double sigma_max = shifted_f32(static_cast<double>(n_train));
  const double sigma_min = shifted_f32(1.0);
  // set_timesteps: numpy float64 linspace between the two, / N, shifted again, then float32.
  const int64_t steps = config.sampling_steps;
  const double start = sigma_max * n_train, stop = sigma_min * n_train;
  std::vector<double> sig(static_cast<size_t>(steps));
  for (int64_t i = 0; i < steps; ++i) {
    double t = start;
    if (steps > 1) t = static_cast<double>(i) * ((stop - start) / static_cast<double>(steps - 1)) + start;
    if (steps > 1 && i == steps - 1) t = stop;
    const double s = t / n_train;
    sig[static_cast<size_t>(i)] = shift * s / (1 + (shift - 1) * s);
  }
  const auto sigmas = at::tensor(sig, at::kDouble).to(at::kFloat);
  Schedule out;
  out.timesteps = sigmas * n_train;
  out.sigmas = at::cat({sigmas, at::zeros({1}, at::kFloat)});
  return out;
}

at::Tensor euler_step(const at::Tensor& x, const at::Tensor& velocity, const Schedule& schedule, int64_t step) {
  if (step < 0 || step + 1 >= schedule.sigmas.numel())
    throw DitError("euler step " + std::to_string(step) + " outside the schedule of " +
                   std::to_string(schedule.sigmas.numel() - 1) + " steps");
  const auto dt = schedule.sigmas[step + 1] - schedule.sigmas[step];  // 0-dim float32
  return (x.to(at::kFloat) + dt.to(velocity.device()) * velocity).to(velocity.scalar_type());
}

// ---------------------------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------------------------
Precision parse_precision(const std::string& name) {
  if (name == "fp32") return Precision::kFp32;
  if (name == "bf16") return Precision::kBf16;
  if (name == "fp8") return Precision::kFp8;
  throw DitError("precision must be fp32, bf16 or fp8, got \"" + name + "\"");
}

c10::ScalarType precision_dtype(Precision precision) {
  return precision == Precision::kFp32 ? at::kFloat : at::kBFloat16;
}

namespace {

bool is_regular_file(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool is_directory(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// A file mapping per shard file: opening reads only the headers; tensors are read when touched.
weights::Checkpoint open_dit(const std::string& path) {
  if (is_directory(path)) {
    const std::string index = path + "/diffusion_pytorch_model.safetensors.index.json";
    if (is_regular_file(index)) return weights::load_sharded_safetensors(index);
    for (const char* name : {"/diffusion_pytorch_model.safetensors", "/weights.safetensors"})
      if (is_regular_file(path + name)) return weights::load_safetensors(path + name);
    throw DitError(path + ": no diffusion_pytorch_model.safetensors(.index.json) or weights.safetensors in it");
  }
  if (ends_with(path, ".index.json")) return weights::load_sharded_safetensors(path);
  return weights::load_safetensors(path);
}

}  // namespace

Model::Model(const ModelConfig& config, c10::Device device, c10::ScalarType dtype, uint64_t seed)
    : config_(config), device_(device), dtype_(dtype) {
  config_.validate();
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)
    throw DitError("model dtype must be float32, bfloat16 or float16");
  precision_ = dtype == at::kFloat ? Precision::kFp32 : Precision::kBf16;
  BuildOptions build;
  build.params.tensor = at::TensorOptions().dtype(dtype).device(device);
  first_layer_ = 0;
  last_layer_ = config_.num_layers;
  module_ = std::make_shared<CausalWanModelS2V>(config_, build);
  (*module_)->eval();
  randomize_parameters(**module_, seed);
}

Model::Model(const ModelConfig& config, const std::string& dit_path, const LoadOptions& options)
    : config_(config), device_(options.device), dtype_(precision_dtype(options.precision)) {
  const auto checkpoint = open_dit(dit_path);
  build(&checkpoint, options, /*own_checkpoint=*/true);
}

Model::Model(const ModelConfig& config, const weights::Checkpoint& checkpoint, const LoadOptions& options)
    : config_(config), device_(options.device), dtype_(precision_dtype(options.precision)) {
  build(&checkpoint, options, /*own_checkpoint=*/false);
}

Model::Model(const ModelConfig& config, const LoadOptions& options, uint64_t seed)
    : config_(config), device_(options.device), dtype_(precision_dtype(options.precision)) {
  build(nullptr, options, /*own_checkpoint=*/false);
  // Drawn where the parameters live, one tensor at a time, with the device's own generator; an FP8 Linear's
  // weight is drawn in the model dtype and quantised as a checkpoint's would be.
  at::NoGradGuard no_grad;
  auto gen = at::globalContext().defaultGenerator(device_);
  {
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_current_seed(seed);
  }
  const auto scaling = options.fp8_scaling;
  std::function<void(torch::nn::Module&)> fill = [&](torch::nn::Module& m) {
    if (auto* lin = dynamic_cast<LinearImpl*>(&m); lin && lin->is_fp8()) {
      auto w = at::empty({lin->out_features, lin->in_features}, at::TensorOptions().dtype(dtype_).device(device_));
      w.normal_(0.0, 0.02, gen);
      auto [q, scale] = weights::quantize_fp8(w, scaling);
      lin->weight_fp8.copy_(q);
      lin->weight_scale.copy_(scale.reshape(lin->weight_scale.sizes()));
      if (lin->bias.defined()) lin->bias.normal_(0.0, 0.1, gen);
      return;
    }
    for (auto& p : m.named_parameters(/*recurse=*/false)) p.value().normal_(0.0, p.value().dim() <= 1 ? 0.1 : 0.02, gen);
    for (auto& child : m.children()) fill(*child);
  };
  fill(**module_);
}

void Model::build(const weights::Checkpoint* checkpoint, const LoadOptions& options, bool own_checkpoint) {
  config_.validate();
  precision_ = options.precision;
  first_layer_ = options.first_layer;
  last_layer_ = options.last_layer < 0 ? config_.num_layers : options.last_layer;
  if (first_layer_ < 0 || first_layer_ >= last_layer_ || last_layer_ > config_.num_layers)
    throw DitError("layer range [" + std::to_string(first_layer_) + ", " + std::to_string(last_layer_) +
                   ") must be a non-empty part of [0, " + std::to_string(config_.num_layers) + ")");
  embeddings_ = options.embeddings.value_or(first_layer_ == 0);
  head_ = options.head.value_or(last_layer_ == config_.num_layers);
  BuildOptions build;
  build.params.tensor = at::TensorOptions().dtype(dtype_).device(device_);
  build.params.fp8 = precision_ == Precision::kFp8;
  build.params.fp8_per_channel = options.fp8_scaling == weights::Fp8Scaling::kPerChannel;
  build.params.fp8_scaled_mm =
      build.params.fp8 && (options.fp8_compute == Fp8Compute::kScaledMm ||
                           (options.fp8_compute == Fp8Compute::kAuto && cuda::supports_fp8(device_)));
  build.params.attention = options.attention;
  build.first_layer = first_layer_;
  build.last_layer = last_layer_;
  build.embeddings = embeddings_;
  build.head = head_;
  module_ = std::make_shared<CausalWanModelS2V>(config_, build);
  (*module_)->eval();
  if (!checkpoint) return;  // random weights (the constructor above fills them)
  StreamLoadOptions lo;
  std::optional<weights::Checkpoint> lora;
  if (!options.lora.empty()) {
    lora = weights::load_safetensors(options.lora);
    lo.lora = &*lora;
  }
  lo.lora_options = options.lora_options;
  lo.fp8_scaling = options.fp8_scaling;
  lo.release_pages = options.release_pages;
  lo.read_files = own_checkpoint;  // opened here: nobody wrote to its mappings
  lo.on_tensor = options.on_tensor;
  load_streaming(**module_, *checkpoint, lo);
}

Model::~Model() = default;

CausalWanModelS2V& Model::module() const { return *module_; }

uint64_t Model::parameter_count() const {
  uint64_t n = 0;
  for (const auto& p : (*module_)->parameters()) n += static_cast<uint64_t>(p.numel());
  return n;
}

uint64_t Model::parameter_bytes() const {
  uint64_t n = 0;
  for (const auto& p : (*module_)->parameters()) n += static_cast<uint64_t>(p.nbytes());
  return n;
}

void Model::load(const weights::Checkpoint& checkpoint) {
  StreamLoadOptions lo;
  lo.fp8_scaling = module()->build_options().params.fp8_per_channel ? weights::Fp8Scaling::kPerChannel
                                                                    : weights::Fp8Scaling::kPerTensor;
  load_streaming(**module_, checkpoint, lo);
}

void Model::require(bool what, const char* part) const {
  if (!what)
    throw DitError(std::string("this model (layers ") + std::to_string(first_layer_) + ".." +
                   std::to_string(last_layer_) + ") does not hold the " + part);
}

at::Tensor Model::embed_text(const at::Tensor& text) const {
  at::NoGradGuard no_grad;
  require(embeddings_, "embeddings (embed_text runs on the first shard)");
  return module()->embed_text(text.to(device_, dtype_));
}

StreamState Model::new_state(int64_t frame_tokens, c10::ScalarType kv_dtype) const {
  if (frame_tokens <= 0) throw DitError("new_state: frame_tokens must be positive");
  if (kv_dtype != c10::ScalarType::Undefined && kv_dtype != at::kFloat && kv_dtype != at::kBFloat16 &&
      kv_dtype != at::kFloat8_e4m3fn)
    throw DitError(std::string("new_state: KV caches are held in float32, bfloat16 or float8_e4m3fn, not ") +
                   c10::toString(kv_dtype));
  StreamState s;
  s.sink.dtype = kv_dtype;
  for (int64_t i = 0; i < config_.sampling_steps; ++i)
    s.rings.push_back(module()->make_kv_cache(frame_tokens, kv_dtype));
  return s;
}

void Model::set_text(const at::Tensor& context_emb, StreamState& state) const {
  at::NoGradGuard no_grad;
  state.text = module()->text_kv(context_emb, first_layer_, last_layer_);
}

SinkInputs Model::prepare_sink(const at::Tensor& ref, const at::Tensor& motion) const {
  at::NoGradGuard no_grad;
  require(embeddings_, "embeddings (prepare_sink runs on the first shard)");
  return module()->prepare_sink(ref, motion);
}

void Model::prefill(SinkInputs& in, StreamState& state, int64_t first, int64_t last) const {
  at::NoGradGuard no_grad;
  module()->prefill_layers(first < 0 ? first_layer_ : first, last < 0 ? last_layer_ : last, in, state.text,
                           state.sink);
}

BlockInputs Model::prepare(const at::Tensor& x, double t, const at::Tensor& audio,
                           const std::vector<RopeSegment>& cond_segments, int64_t current_start, int64_t rope_offset,
                           int64_t ring_capacity, const at::Tensor& cond_states) const {
  at::NoGradGuard no_grad;
  require(embeddings_, "embeddings (prepare runs on the first shard)");
  return module()->prepare_block(x, t, cond_states, audio.dim() == 3 ? audio.unsqueeze(0) : audio, cond_segments,
                                 current_start, rope_offset, ring_capacity);
}

void Model::run_layers(BlockInputs& in, StreamState& state, int64_t step, int64_t first, int64_t last) const {
  at::NoGradGuard no_grad;
  if (step < 0 || step >= static_cast<int64_t>(state.rings.size()))
    throw DitError("run_layers: step " + std::to_string(step) + " outside the state's " +
                   std::to_string(state.rings.size()) + " KV rings (new_state makes one per sampling step)");
  module()->run_layers(first < 0 ? first_layer_ : first, last < 0 ? last_layer_ : last, in, state.text,
                       state.rings[static_cast<size_t>(step)], state.sink);
}

at::Tensor Model::head(const BlockInputs& in) const {
  at::NoGradGuard no_grad;
  require(head_, "output head (head runs on the last shard)");
  return module()->apply_head(in);
}

// ---------------------------------------------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------------------------------------------
struct Session::State {
  at::Tensor context_emb;
  at::Tensor ref;
  at::Tensor motion;
  at::Tensor refresh_motion;
  std::vector<StreamState> shards;  // one per shard, rings one per denoising step
  std::vector<RopeSegment> segments;
  int64_t capacity = 0;             // ring tokens
  Schedule schedule;
  at::Tensor clip_noise;
  int64_t frame_tokens = 0;
  int64_t block = 0;  // blocks generated (absolute)
  int64_t calls = 0;  // DiT calls made (for the RoPE offsets)
  int64_t steps = 0;  // denoising steps per block (set_steps); 0 = the whole schedule
  bool caches_valid = false;  // set_condition completed
  std::vector<std::unique_ptr<cuda::Graphs>> graphs;  // one per shard (SessionOptions::cuda_graphs)
};

Session::Session(const Model& model, SessionOptions options) : Session(std::vector<const Model*>{&model}, std::move(options)) {}

Session::Session(std::vector<const Model*> shards, SessionOptions options)
    : shards_(std::move(shards)), options_(std::move(options)), state_(std::make_unique<State>()) {
  if (shards_.empty()) throw DitError("a session needs at least one model");
  const auto& cfg = shards_.front()->config();
  int64_t next = 0;
  for (size_t i = 0; i < shards_.size(); ++i) {
    const Model* m = shards_[i];
    if (m == nullptr) throw DitError("session: shard " + std::to_string(i) + " is null");
    if (m->config().num_layers != cfg.num_layers || m->config().dim != cfg.dim)
      throw DitError("session: shard " + std::to_string(i) + " has another model configuration");
    if (m->first_layer() != next)
      throw DitError("session: shard " + std::to_string(i) + " starts at layer " + std::to_string(m->first_layer()) +
                     ", expected " + std::to_string(next) + " (shards in layer order, each layer once)");
    next = m->last_layer();
  }
  if (next != cfg.num_layers)
    throw DitError("session: the shards end at layer " + std::to_string(next) + " of " +
                   std::to_string(cfg.num_layers));
  if (!shards_.front()->has_embeddings()) throw DitError("session: the first shard must hold the embeddings");
  if (!shards_.back()->has_head()) throw DitError("session: the last shard must hold the head");
  state_->schedule = make_schedule(cfg);
  if (options_.cuda_graphs)
    for (const Model* m : shards_) state_->graphs.push_back(std::make_unique<cuda::Graphs>(m->device()));
}

Session::~Session() = default;

std::string Session::graph_status() const {
  const auto& g = state_->graphs;
  if (g.empty()) return "off";
  size_t n = 0;
  int64_t replays = 0;
  for (const auto& x : g) {
    if (!x->fallback_reason().empty()) return "eager: " + x->fallback_reason();
    n += x->graphs();
    replays += x->replays();
  }
  return std::to_string(n) + " graphs, " + std::to_string(replays) + " replays";
}

int64_t Session::blocks_done() const { return state_->block; }

void Session::check_cancelled() const {
  if (options_.cancelled && options_.cancelled()) throw Cancelled();
}

void Session::set_condition(const at::Tensor& ref_latent, const at::Tensor& motion_latents,
                            const at::Tensor& text_context) {
  at::NoGradGuard no_grad;
  const Model& first = *shards_.front();
  const auto& cfg = first.config();
  if (ref_latent.dim() != 4 || ref_latent.size(2) % 8 != 0 || ref_latent.size(3) % 8 != 0)
    throw DitError("reference latent [C, 1, H, W] needs H and W multiples of 8 (FramePack 4x bucket), got " +
                   c10::str(ref_latent.sizes()));
  auto& st = *state_;
  st.caches_valid = false;
  const int64_t frame_tokens = (ref_latent.size(2) / cfg.patch_size[1]) * (ref_latent.size(3) / cfg.patch_size[2]);
  st.context_emb = first.embed_text(text_context);
  st.shards.clear();
  for (const Model* m : shards_) {
    st.shards.push_back(m->new_state(frame_tokens, options_.kv_dtype));
    m->set_text(st.context_emb, st.shards.back());
  }
  st.ref = ref_latent;
  st.motion = motion_latents;
  st.frame_tokens = frame_tokens;
  st.capacity = st.shards.front().rings.front().capacity;
  prefill_sink(st.ref, st.motion);
  st.block = 0;
  st.calls = 0;
  st.caches_valid = true;
}

void Session::prefill_sink(const at::Tensor& ref, const at::Tensor& motion) {
  auto& st = *state_;
  for (auto& g : st.graphs) g->clear();  // the graphs read the sink's (and the text's) storage
  auto in = shards_.front()->prepare_sink(ref, motion);
  for (size_t k = 0; k < shards_.size(); ++k) {
    if (k > 0) check_cancelled();
    shards_[k]->prefill(in, st.shards[k]);
  }
  st.segments = in.segments;
}

void Session::set_steps(int64_t steps) {
  const int64_t n = shards_.front()->config().sampling_steps;
  if (steps < 1 || steps > n)
    throw DitError("denoising steps must be 1 .. " + std::to_string(n) + ", got " + std::to_string(steps));
  state_->steps = steps;
}

int64_t Session::steps() const {
  return state_->steps > 0 ? state_->steps : shards_.front()->config().sampling_steps;
}

// The first step is the only one trained on pure noise, and the last ones write the KV rings of the nearly clean
// latents that later blocks lean on most: fewer steps drop the ones in between, from the second on.
std::vector<int64_t> Session::step_subset(int64_t sampling_steps, int64_t steps) {
  if (sampling_steps < 1 || steps < 1 || steps > sampling_steps)
    throw DitError("denoising steps must be 1 .. " + std::to_string(sampling_steps) + ", got " +
                   std::to_string(steps));
  std::vector<int64_t> out{0};
  for (int64_t i = sampling_steps - steps + 1; i < sampling_steps; ++i) out.push_back(i);
  return out;
}

void Session::set_refresh_motion(const at::Tensor& motion_latents) { state_->refresh_motion = motion_latents; }

namespace {
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}
}  // namespace

int64_t rope_offset_of_call(const ModelConfig& cfg, const SessionOptions& options, int64_t call) {
  if (call < static_cast<int64_t>(options.rope_offsets.size())) return options.rope_offsets[static_cast<size_t>(call)];
  const auto span = static_cast<uint64_t>(cfg.rope_offset_max - cfg.rope_offset_min + 1);
  return cfg.rope_offset_min +
         static_cast<int64_t>(splitmix64(options.rope_seed * 0x100000001B3ull + static_cast<uint64_t>(call)) % span);
}

namespace {
// An Euler step from the schedule's step `from` straight to step `to` (the end of the schedule: sigma 0). With
// to = from + 1 it computes exactly what euler_step does.
at::Tensor euler_jump(const at::Tensor& x, const at::Tensor& velocity, const Schedule& schedule, int64_t from,
                      int64_t to) {
  const auto dt = schedule.sigmas[to] - schedule.sigmas[from];  // 0-dim float32
  return (x.to(at::kFloat) + dt.to(velocity.device()) * velocity).to(velocity.scalar_type());
}
}  // namespace

BlockResult Session::generate_block(const at::Tensor& audio, const std::optional<at::Tensor>& noise) {
  at::NoGradGuard no_grad;
  auto& st = *state_;
  if (!st.caches_valid) throw DitError("generate_block before set_condition: the sink must be prefilled first");
  const Model& first = *shards_.front();
  const Model& last = *shards_.back();
  const auto& cfg = first.config();
  const int64_t per_clip = cfg.clip_frames / cfg.frames_per_block;
  const int64_t clip = st.block / per_clip, in_clip = st.block % per_clip;
  check_cancelled();

  if (in_clip == 0) {
    if (clip == 1 && options_.roll_sink) {
      // Rolling sink: the first generated latent frame becomes the reference; re-prefill (same shapes).
      prefill_sink(st.ref, st.refresh_motion.defined() ? st.refresh_motion : st.motion);
    }
    auto gen = at::make_generator<at::CPUGeneratorImpl>(options_.seed + static_cast<uint64_t>(clip));
    st.clip_noise = at::randn({cfg.in_dim, cfg.clip_frames, st.ref.size(2), st.ref.size(3)}, gen,
                              at::TensorOptions().dtype(first.dtype()));
  }
  auto latents = noise ? noise->to(first.dtype())
                       : st.clip_noise.slice(1, in_clip * cfg.frames_per_block, (in_clip + 1) * cfg.frames_per_block);
  latents = latents.to(first.device());
  const auto a = audio.dim() == 3 ? audio.unsqueeze(0) : audio;
  const int64_t current_start = st.block * cfg.frames_per_block * st.frame_tokens;

  BlockResult result;
  result.steps = step_subset(cfg.sampling_steps, st.steps > 0 ? st.steps : cfg.sampling_steps);
  const int64_t calls_before = st.calls;
  RingWindow window;
  int64_t seq = 0;
  try {
    for (size_t j = 0; j < result.steps.size(); ++j) {
      const int64_t i = result.steps[j];
      const int64_t to = j + 1 < result.steps.size() ? result.steps[j + 1] : cfg.sampling_steps;
      if (j > 0) check_cancelled();
      const int64_t offset = rope_offset_of_call(cfg, options_, st.calls);
      ++st.calls;
      result.rope_offsets.push_back(offset);
      const double t = st.schedule.timesteps[i].item<double>();
      auto in = first.prepare(latents, t, a, st.segments, current_start, offset, st.capacity);
      window = in.window;
      seq = in.hidden.size(1);
      for (size_t k = 0; k < shards_.size(); ++k) {
        if (k > 0) check_cancelled();
        if (st.graphs.empty()) {
          shards_[k]->run_layers(in, st.shards[k], i);
          continue;
        }
        // One graph per (step, ring slot): the ring rows written and read are part of what is captured.
        const auto dev = shards_[k]->device();
        std::vector<at::Tensor*> inputs{&in.hidden,       &in.e0,       &in.audio_global, &in.audio_local,
                                        &in.rope.cos,     &in.rope.sin, &in.cond_rope.cos, &in.cond_rope.sin};
        for (auto* t : inputs)
          if (t->defined() && t->device() != dev) *t = t->to(dev);
        st.graphs[k]->run(graph_key(i, in.window), inputs, &in.hidden, [&] { shards_[k]->run_layers(in, st.shards[k], i); });
      }
      const auto velocity = last.head(in).to(first.device());
      result.velocities.push_back(velocity);
      latents = euler_jump(latents, velocity, st.schedule, i, to);
    }
  } catch (const Cancelled&) {
    // The block is dropped: the next call redoes it at the same position (ring rows are overwritten).
    st.calls = calls_before;
    throw;
  }
  // Skipped steps: their rings take this block's K/V from the run step nearest in noise level (the noisier one on a
  // tie), so the block is at its place in every ring and no ring keeps the stale rows of a block 12 frames back.
  if (static_cast<int64_t>(result.steps.size()) < cfg.sampling_steps) {
    const auto sig = st.schedule.sigmas;
    for (int64_t s = 0; s < cfg.sampling_steps; ++s) {
      if (std::find(result.steps.begin(), result.steps.end(), s) != result.steps.end()) continue;
      int64_t from = result.steps.front();
      double best = 1e30;
      for (const int64_t u : result.steps) {
        const double d = std::abs(sig[s].item<double>() - sig[u].item<double>());
        if (d < best) best = d, from = u;
      }
      for (auto& shard : st.shards) {
        auto& dst = shard.rings[static_cast<size_t>(s)].layers;
        const auto& src = shard.rings[static_cast<size_t>(from)].layers;
        for (size_t l = 0; l < dst.size(); ++l) {
          if (!dst[l].k.defined() || !src[l].k.defined()) continue;  // a layer of another shard
          dst[l].k.slice(1, window.start, window.start + seq).copy_(src[l].k.slice(1, window.start, window.start + seq));
          dst[l].v.slice(1, window.start, window.start + seq).copy_(src[l].v.slice(1, window.start, window.start + seq));
        }
      }
    }
  }
  if (clip == 0 && in_clip == 0) st.ref = latents.slice(1, 0, 1).clone();  // the next sink's reference
  ++st.block;
  result.latents = latents;
  return result;
}

}  // namespace liveavatar::dit
