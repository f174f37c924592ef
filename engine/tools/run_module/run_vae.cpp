// liveavatar-run-module: the VAE modules (vae_encode, vae_decode, vae_stream_decode).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <ATen/ATen.h>
#include <ATen/core/grad_mode.h>
#include <sys/stat.h>

#include <optional>

#include "vae/vae.h"
#include "weights/weights.h"
#include "run_module.h"

namespace liveavatar::dit::tool {
namespace {

bool is_dir(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}
bool is_file(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

/// A weights file, or the VAE file inside a directory.
std::string vae_weights_file(const std::string& w) {
  if (!is_dir(w)) return w;
  for (const char* name : {"/Wan2.1_VAE.pth", "/Wan2.1_VAE.safetensors", "/vae.safetensors", "/weights.safetensors"})
    if (is_file(w + name)) return w + name;
  throw vae::VaeError(w + ": no Wan2.1_VAE.pth, Wan2.1_VAE.safetensors, vae.safetensors or weights.safetensors in it");
}

const at::Tensor& need(const TensorMap& in, const std::string& name, const std::string& module) {
  const auto it = in.find(name);
  if (it == in.end()) throw vae::VaeError("module '" + module + "' needs the input tensor '" + name + "'");
  return it->second;
}
at::Tensor opt(const TensorMap& in, const std::string& name) {
  const auto it = in.find(name);
  return it == in.end() ? at::Tensor() : it->second;
}
/// Unbatched [C, T, H, W] -> [1, C, T, H, W].
at::Tensor batched(const at::Tensor& t) { return t.dim() == 4 ? t.unsqueeze(0) : t; }

}  // namespace

std::string vae_modules_help() {
  return R"(VAE modules (--weights Wan2.1_VAE.pth, a .safetensors or a folder holding one: dim and z_dim are read from
it; without weights, seeded random weights of the real shape, or dim 16 with --tiny; tensors [B, C, T, H, W], a
missing batch dimension is accepted):
  vae_encode        video [3, 1 + 4k, H, W] in [-1, 1] [, mode (0: chunks 1, 4, 4 ..; 1: chunks 1, rest)]
                                                            -> latents [16, 1 + k, H/8, W/8] (normalised)
  vae_decode        latents [16, T, h, w]                   -> video [3, 1 + 4(T - 1), 8h, 8w] in [-1, 1]
  vae_stream_decode latents [16, 3N, h, w] (or latents.<b>) [, prime [16, P, h, w], block_frames (3)]
                                                            -> video.<b> [3, 4 * block_frames, 8h, 8w], video)";
}

bool run_vae(const RunRequest& request, const TensorMap& inputs, TensorMap& out) {
  const std::string& mod = request.module;
  if (mod != "vae_encode" && mod != "vae_decode" && mod != "vae_stream_decode") return false;
  at::NoGradGuard no_grad;
  // With weights, dim and z_dim come from the checkpoint's shapes; without, --tiny or the real shape.
  std::optional<weights::Checkpoint> checkpoint;
  if (!request.weights.empty()) {
    const auto file = vae_weights_file(request.weights);
    const std::string ext = ".safetensors";
    const bool st = file.size() >= ext.size() && file.compare(file.size() - ext.size(), ext.size(), ext) == 0;
    checkpoint = st ? weights::load_safetensors(file) : weights::load_pth(file);
  }
  const auto config = checkpoint ? vae::VaeConfig::from_checkpoint(*checkpoint)
                                 : (request.tiny ? vae::VaeConfig::tiny() : vae::VaeConfig{});
  vae::WanVae model(config, c10::kCPU, c10::kFloat, request.seed);
  if (checkpoint) model.load(*checkpoint);

  if (mod == "vae_encode") {
    const auto video = batched(need(inputs, "video", mod));
    const auto m = opt(inputs, "mode");
    const bool two = m.defined() && m.reshape({-1})[0].item<int64_t>() == 1;
    out["latents"] = two ? model.encode_two_chunks(video) : model.encode(video);
  } else if (mod == "vae_decode") {
    out["video"] = model.decode(batched(need(inputs, "latents", mod)));
  } else {
    vae::StreamingDecoder decoder(model);
    const auto prime = opt(inputs, "prime");
    if (prime.defined()) decoder.prime(batched(prime));
    const auto bf = opt(inputs, "block_frames");
    const int64_t block_frames = bf.defined() ? bf.reshape({-1})[0].item<int64_t>() : 3;
    if (block_frames < 1) throw vae::VaeError("block_frames must be >= 1");
    std::vector<at::Tensor> blocks;
    const auto all = opt(inputs, "latents");
    if (all.defined()) {
      const auto z = batched(all);
      if (z.dim() != 5 || z.size(2) % block_frames != 0)
        throw vae::VaeError("vae_stream_decode: latents " + c10::str(z.sizes()) + " must hold a multiple of " +
                            std::to_string(block_frames) + " frames (dim 2)");
      for (int64_t b = 0; b < z.size(2) / block_frames; ++b)
        blocks.push_back(z.slice(2, b * block_frames, (b + 1) * block_frames));
    } else {
      for (int64_t b = 0;; ++b) {
        const auto t = opt(inputs, "latents." + std::to_string(b));
        if (!t.defined()) break;
        blocks.push_back(batched(t));
      }
      if (blocks.empty()) throw vae::VaeError("module 'vae_stream_decode' needs 'latents' or 'latents.0', ...");
    }
    std::vector<at::Tensor> videos;
    for (size_t b = 0; b < blocks.size(); ++b) {
      videos.push_back(decoder.decode_block(blocks[b]));
      out["video." + std::to_string(b)] = videos.back();
    }
    out["video"] = at::cat(videos, 2);
  }
  return true;
}

}  // namespace liveavatar::dit::tool
