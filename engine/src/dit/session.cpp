// Model (weights on one device) and Session (the `single` streaming plan: 4 KV rings, one sink, seeded noise),
// plus the flow-matching Euler schedule. SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/DefaultDtype.h>

#include "liveavatar/weights.h"
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
namespace {
// Modules upstream runs under autocast(float32): they stay fp32 whatever the model dtype.
void keep_fp32(CausalWanModelS2VImpl& m) {
  m.time_embedding->to(at::kFloat);
  m.time_projection->to(at::kFloat);
  m.head->to(at::kFloat);
  m.casual_audio_encoder->to(at::kFloat);
}
}  // namespace

Model::Model(const ModelConfig& config, c10::Device device, c10::ScalarType dtype, uint64_t seed)
    : config_(config), device_(device), dtype_(dtype) {
  config_.validate();
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)
    throw DitError("model dtype must be float32, bfloat16 or float16");
  // Build in the target dtype so that a 14B tree takes 2 bytes per parameter on the host, not 4.
  const auto previous = c10::get_default_dtype();
  c10::set_default_dtype(c10::scalarTypeToTypeMeta(dtype));
  try {
    module_ = std::make_shared<CausalWanModelS2V>(config_);
  } catch (...) {
    c10::set_default_dtype(previous);
    throw;
  }
  c10::set_default_dtype(previous);
  (*module_)->eval();
  randomize_parameters(**module_, seed);
  (*module_)->to(device, dtype);
  keep_fp32(**module_);
}

Model::~Model() = default;

CausalWanModelS2V& Model::module() const { return *module_; }

uint64_t Model::parameter_count() const {
  uint64_t n = 0;
  for (const auto& p : (*module_)->parameters()) n += static_cast<uint64_t>(p.numel());
  return n;
}

void Model::load(const weights::Checkpoint& checkpoint) {
  weights::ModuleLoadOptions options;
  options.assign = false;  // copy into the existing tensors (device, dtype kept; fp32 modules stay fp32)
  options.cast_dtype = true;
  weights::load_into_module(**module_, checkpoint, options);
}

// ---------------------------------------------------------------------------------------------------------------
// Session
// ---------------------------------------------------------------------------------------------------------------
struct Session::State {
  at::Tensor context_emb;
  at::Tensor ref;
  at::Tensor motion;
  at::Tensor refresh_motion;
  CondCache cond;
  std::vector<KVCache> caches;  // one per denoising step
  Schedule schedule;
  at::Tensor clip_noise;
  int64_t frame_tokens = 0;
  int64_t block = 0;  // blocks generated (absolute)
  int64_t calls = 0;  // DiT calls made (for the RoPE offsets)
};

Session::Session(const Model& model, SessionOptions options)
    : model_(model), options_(std::move(options)), state_(std::make_unique<State>()) {
  state_->schedule = make_schedule(model_.config());
}

Session::~Session() = default;

int64_t Session::blocks_done() const { return state_->block; }

void Session::set_condition(const at::Tensor& ref_latent, const at::Tensor& motion_latents,
                            const at::Tensor& text_context) {
  at::NoGradGuard no_grad;
  auto& m = *model_.module();
  const auto& cfg = model_.config();
  if (ref_latent.dim() != 4 || ref_latent.size(2) % 8 != 0 || ref_latent.size(3) % 8 != 0)
    throw DitError("reference latent [C, 1, H, W] needs H and W multiples of 8 (FramePack 4x bucket), got " +
                   c10::str(ref_latent.sizes()));
  state_->context_emb = m.embed_text(text_context.to(model_.device(), model_.dtype()));
  state_->ref = ref_latent;
  state_->motion = motion_latents;
  m.prefill(ref_latent, motion_latents, state_->context_emb, state_->cond);
  state_->frame_tokens = (ref_latent.size(2) / cfg.patch_size[1]) * (ref_latent.size(3) / cfg.patch_size[2]);
  state_->caches.clear();
  for (int64_t i = 0; i < cfg.sampling_steps; ++i) state_->caches.push_back(m.make_kv_cache(state_->frame_tokens));
  state_->block = 0;
  state_->calls = 0;
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

BlockResult Session::generate_block(const at::Tensor& audio, const std::optional<at::Tensor>& noise) {
  at::NoGradGuard no_grad;
  auto& st = *state_;
  if (st.caches.empty()) throw DitError("generate_block before set_condition: the sink must be prefilled first");
  auto& m = *model_.module();
  const auto& cfg = model_.config();
  const int64_t per_clip = cfg.clip_frames / cfg.frames_per_block;
  const int64_t clip = st.block / per_clip, in_clip = st.block % per_clip;

  if (in_clip == 0) {
    if (clip == 1 && options_.roll_sink) {
      // Rolling sink: the first generated latent frame becomes the reference; re-prefill (same shapes).
      m.prefill(st.ref, st.refresh_motion.defined() ? st.refresh_motion : st.motion, st.context_emb, st.cond);
    }
    auto gen = at::make_generator<at::CPUGeneratorImpl>(options_.seed + static_cast<uint64_t>(clip));
    st.clip_noise = at::randn({cfg.in_dim, cfg.clip_frames, st.ref.size(2), st.ref.size(3)}, gen,
                              at::TensorOptions().dtype(model_.dtype()));
  }
  auto latents = noise ? noise->to(model_.dtype())
                       : st.clip_noise.slice(1, in_clip * cfg.frames_per_block, (in_clip + 1) * cfg.frames_per_block);
  latents = latents.to(model_.device());
  const auto a = audio.dim() == 3 ? audio.unsqueeze(0) : audio;
  const int64_t current_start = st.block * cfg.frames_per_block * st.frame_tokens;

  BlockResult result;
  for (int64_t i = 0; i < cfg.sampling_steps; ++i) {
    int64_t offset;
    if (st.calls < static_cast<int64_t>(options_.rope_offsets.size())) {
      offset = options_.rope_offsets[static_cast<size_t>(st.calls)];
    } else {
      const auto span = static_cast<uint64_t>(cfg.rope_offset_max - cfg.rope_offset_min + 1);
      offset = cfg.rope_offset_min +
               static_cast<int64_t>(splitmix64(options_.rope_seed * 0x100000001B3ull + static_cast<uint64_t>(st.calls)) % span);
    }
    ++st.calls;
    result.rope_offsets.push_back(offset);
    const double t = st.schedule.timesteps[i].item<double>();
    const auto velocity = m.forward_block(latents, t, st.context_emb, at::Tensor(), a, st.caches[static_cast<size_t>(i)],
                                          st.cond, current_start, offset);
    result.velocities.push_back(velocity);
    latents = euler_step(latents, velocity, st.schedule, i);
  }
  if (clip == 0 && in_clip == 0) st.ref = latents.slice(1, 0, 1).clone();  // the next sink's reference
  ++st.block;
  result.latents = latents;
  return result;
}

}  // namespace liveavatar::dit
