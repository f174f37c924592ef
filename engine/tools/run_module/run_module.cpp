// SPDX-License-Identifier: LGPL-2.1-or-later
#include "run_module.h"

#include <sys/stat.h>

#include <fstream>

#include "dit/dit.h"
#include "weights/weights.h"
#include "model.h"

namespace liveavatar::dit::tool {
namespace {

bool is_file(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}
bool is_dir(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

const at::Tensor& need(const TensorMap& in, const std::string& name, const std::string& module) {
  const auto it = in.find(name);
  if (it == in.end()) throw DitError("module '" + module + "' needs the input tensor '" + name + "'");
  return it->second;
}
at::Tensor opt(const TensorMap& in, const std::string& name) {
  const auto it = in.find(name);
  return it == in.end() ? at::Tensor() : it->second;
}
int64_t opt_int(const TensorMap& in, const std::string& name, int64_t fallback) {
  const auto t = opt(in, name);
  return t.defined() ? t.reshape({-1})[0].item<int64_t>() : fallback;
}
at::Tensor squeeze_batch(const at::Tensor& t, int64_t dims) {
  return t.dim() == dims + 1 && t.size(0) == 1 ? t[0] : t;
}
at::Tensor audio4(const at::Tensor& a) { return a.dim() == 3 ? a.unsqueeze(0) : a; }

ModelConfig resolve_config(const RunRequest& r) {
  std::string path = r.config;
  if (path.empty() && !r.weights.empty()) {
    const std::string dir = is_dir(r.weights) ? r.weights : r.weights.substr(0, r.weights.find_last_of('/') + 1);
    const std::string candidate = (dir.empty() ? std::string(".") : dir) + "/config.json";
    if (is_file(candidate)) path = candidate;
  }
  if (!path.empty()) return ModelConfig::from_json_file(path);
  return r.tiny ? ModelConfig::tiny() : ModelConfig{};
}

weights::Checkpoint load_weights(const std::string& w) {
  if (is_dir(w)) {
    const std::string index = w + "/diffusion_pytorch_model.safetensors.index.json";
    if (is_file(index)) return weights::load_sharded_safetensors(index);
    for (const char* name : {"/weights.safetensors", "/diffusion_pytorch_model.safetensors"})
      if (is_file(w + name)) return weights::load_safetensors(w + name);
    throw DitError(w + ": no diffusion_pytorch_model.safetensors(.index.json) or weights.safetensors in it");
  }
  return weights::load_safetensors(w);
}

void put_cache(TensorMap& out, const std::string& prefix, const std::vector<LayerKV>& layers) {
  for (size_t i = 0; i < layers.size(); ++i) {
    out[prefix + "k." + std::to_string(i)] = layers[i].k;
    out[prefix + "v." + std::to_string(i)] = layers[i].v;
  }
}

}  // namespace

// VAE modules (run_vae.cpp).
std::string vae_modules_help();
bool run_vae(const RunRequest& request, const TensorMap& inputs, TensorMap& out);
// Encoder modules (run_encoders.cpp).
std::string encoder_modules_help();
bool run_encoders(const RunRequest& request, const TensorMap& inputs, TensorMap& out);

std::string modules_help() {
  return R"(Modules (inputs -> outputs; latents unbatched [C, F, H, W], a leading batch of 1 is accepted):
  schedule          -                                       -> timesteps [steps], sigmas [steps + 1]
  text_embedding    context [L, text_dim]                   -> context_emb [1, text_len, dim]
  time_embedding    t [F]                                   -> e [F, dim], e0 [1, F, 6, 2, dim]
  audio_encoder     audio [1, 25, audio_dim, T]             -> audio_global, audio_local (raw encoder, no padding)
  audio_tokens      audio [1, 25, audio_dim, 4F]            -> audio_global, audio_local (padded, motion dropped)
  frame_packer      motion_latents [16, T, H, W]            -> motion_tokens [1, N, dim]
  sink              ref_latents, motion_latents, context    -> cond_k.<layer>, cond_v.<layer> (un-roped)
  block             ref_latents, motion_latents, context, x, t, audio [, cond_states, current_start (0),
                    rope_offset (30), kv_k.<layer>, kv_v.<layer>]
                                                            -> noise_pred [16, F, H, W], kv_k.<layer>, kv_v.<layer>
  stream            ref_latents, motion_latents, context, audio [25, audio_dim, 4F * N] (or audio.<b>),
                    num_blocks [, seed (0), rope_offsets [N * steps], noise.<b>, refresh_motion_latents,
                    roll_sink (1)]
                                                            -> latents.<b> [16, F, H, W], latents (all blocks on F),
                                                               velocity.<b>.<step>,
                                                               rope_offsets, timesteps, sigmas)" +
         std::string("\n") + vae_modules_help() + "\n" + encoder_modules_help();
}

TensorMap run(const RunRequest& request, const TensorMap& inputs) {
  at::NoGradGuard no_grad;
  if (TensorMap vae_out; run_vae(request, inputs, vae_out)) return vae_out;
  if (TensorMap enc_out; run_encoders(request, inputs, enc_out)) return enc_out;
  const ModelConfig config = resolve_config(request);
  const std::string& mod = request.module;
  TensorMap out;
  if (mod == "schedule") {
    const auto s = make_schedule(config);
    return {{"timesteps", s.timesteps}, {"sigmas", s.sigmas}};
  }
  // Real weights: built directly from the checkpoint (no random values drawn first); otherwise seeded random.
  LoadOptions lo;
  lo.precision = Precision::kFp32;
  const auto model = request.weights.empty()
                         ? std::make_unique<Model>(config, c10::kCPU, c10::kFloat, request.seed)
                         : std::make_unique<Model>(config, load_weights(request.weights), lo);
  auto& m = *model->module();

  if (mod == "text_embedding") {
    out["context_emb"] = m.embed_text(squeeze_batch(need(inputs, "context", mod), 2));
  } else if (mod == "time_embedding") {
    auto [e, e0] = m.embed_time(need(inputs, "t", mod).reshape({-1}).to(at::kFloat));
    out["e"] = e;
    out["e0"] = e0;
  } else if (mod == "audio_encoder") {
    auto [g, l] = m.casual_audio_encoder->forward(audio4(need(inputs, "audio", mod)));
    if (g.defined()) out["audio_global"] = g;
    out["audio_local"] = l;
  } else if (mod == "audio_tokens") {
    auto [g, l] = m.encode_audio(audio4(need(inputs, "audio", mod)));
    if (g.defined()) out["audio_global"] = g;
    out["audio_local"] = l;
  } else if (mod == "frame_packer") {
    out["motion_tokens"] = m.frame_packer(squeeze_batch(need(inputs, "motion_latents", mod), 4));
  } else if (mod == "sink" || mod == "block") {
    const auto ref = squeeze_batch(need(inputs, "ref_latents", mod), 4);
    const auto motion = squeeze_batch(need(inputs, "motion_latents", mod), 4);
    const auto ctx = m.embed_text(squeeze_batch(need(inputs, "context", mod), 2));
    CondCache cond;
    m.prefill(ref, motion, ctx, cond);
    if (mod == "sink") {
      put_cache(out, "cond_", cond.layers);
    } else {
      const auto x = squeeze_batch(need(inputs, "x", mod), 4);
      const int64_t frame_tokens = (x.size(2) / 2) * (x.size(3) / 2);
      KVCache kv = m.make_kv_cache(frame_tokens);
      for (size_t i = 0; i < kv.layers.size(); ++i) {
        const auto k = opt(inputs, "kv_k." + std::to_string(i)), v = opt(inputs, "kv_v." + std::to_string(i));
        if (k.defined()) kv.layers[i].k.copy_(k);
        if (v.defined()) kv.layers[i].v.copy_(v);
      }
      const double t = need(inputs, "t", mod).reshape({-1})[0].item<double>();
      const auto cs = opt(inputs, "cond_states");
      out["noise_pred"] = m.forward_block(x, t, ctx, cs.defined() ? squeeze_batch(cs, 4) : cs,
                                          audio4(need(inputs, "audio", mod)), kv, cond,
                                          opt_int(inputs, "current_start", 0), opt_int(inputs, "rope_offset", 30));
      put_cache(out, "kv_", kv.layers);
    }
  } else if (mod == "stream") {
    SessionOptions so;
    so.seed = static_cast<uint64_t>(opt_int(inputs, "seed", 0));
    so.roll_sink = opt_int(inputs, "roll_sink", 1) != 0;
    const auto offsets = opt(inputs, "rope_offsets");
    if (offsets.defined()) {
      const auto o = offsets.reshape({-1}).to(at::kLong).contiguous();
      so.rope_offsets.assign(o.data_ptr<int64_t>(), o.data_ptr<int64_t>() + o.numel());
    }
    Session session(*model, so);
    session.set_condition(squeeze_batch(need(inputs, "ref_latents", mod), 4),
                          squeeze_batch(need(inputs, "motion_latents", mod), 4),
                          squeeze_batch(need(inputs, "context", mod), 2));
    const auto refresh = opt(inputs, "refresh_motion_latents");
    if (refresh.defined()) session.set_refresh_motion(squeeze_batch(refresh, 4));
    const int64_t blocks = opt_int(inputs, "num_blocks", 1);
    const int64_t per_block = config.audio_frames_per_block();
    const auto audio_all = opt(inputs, "audio");
    std::vector<at::Tensor> all;
    std::vector<int64_t> used;
    for (int64_t b = 0; b < blocks; ++b) {
      at::Tensor a = opt(inputs, "audio." + std::to_string(b));
      if (!a.defined()) {
        if (!audio_all.defined()) throw DitError("stream needs 'audio' or 'audio." + std::to_string(b) + "'");
        const auto full = audio4(audio_all);
        if (full.size(3) < (b + 1) * per_block)
          throw DitError("audio has " + std::to_string(full.size(3)) + " frames, block " + std::to_string(b) +
                         " needs " + std::to_string((b + 1) * per_block));
        a = full.slice(3, b * per_block, (b + 1) * per_block);
      }
      const auto noise = opt(inputs, "noise." + std::to_string(b));
      auto r = session.generate_block(audio4(a), noise.defined() ? std::optional<at::Tensor>(squeeze_batch(noise, 4))
                                                                 : std::nullopt);
      out["latents." + std::to_string(b)] = r.latents;
      for (size_t i = 0; i < r.velocities.size(); ++i)
        out["velocity." + std::to_string(b) + "." + std::to_string(i)] = r.velocities[i];
      all.push_back(r.latents);
      used.insert(used.end(), r.rope_offsets.begin(), r.rope_offsets.end());
    }
    out["latents"] = at::cat(all, 1);
    out["rope_offsets"] = at::tensor(used, at::kLong);
    const auto s = make_schedule(config);
    out["timesteps"] = s.timesteps;
    out["sigmas"] = s.sigmas;
  } else {
    throw DitError("unknown module '" + mod + "'\n" + modules_help());
  }
  return out;
}

}  // namespace liveavatar::dit::tool
