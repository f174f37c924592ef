// Wan2.1 VAE building blocks. Submodule / parameter names are the keys of Wan2.1_VAE.pth, so loading is a name
// match (encoder.downsamples.3.residual.2.weight, decoder.upsamples.3.time_conv.bias, conv1.weight, ...).
// SPDX-License-Identifier: LGPL-2.1-or-later
//
// Causality: every temporal convolution sees its input stream padded with zeros at the start. Streams are fed in
// chunks (encode: 1 frame, then 4; decode: 1 latent frame at a time) and a FeatureCache carries, per causal layer,
// what that layer needs of the previous chunks (the last kCacheFrames input frames; for the temporal resamplers,
// whether the stream has started). Layers take their slot from the cache in call order, as upstream's feat_idx.
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/pimpl.h>

#include <array>
#include <vector>

#include "vae/vae.h"

namespace liveavatar::vae {

/// Frames of history a kernel-3 causal convolution needs (upstream CACHE_T).
constexpr int64_t kCacheFrames = 2;

/// One causal layer's memory of its stream (upstream feat_cache[idx]).
struct CacheSlot {
  bool started = false;  // the layer has seen a chunk (upstream: slot is not None)
  at::Tensor frames;     // the last input frames kept for the next chunk (undefined: none yet)
};

/// The causal caches of one encoder or decoder stream.
class FeatureCache {
 public:
  /// The next layer's slot (created on first use).
  CacheSlot& take() {
    if (next_ == slots_.size()) slots_.emplace_back();
    return slots_[next_++];
  }
  /// Called before each chunk: layers take their slots from the first again.
  void rewind() { next_ = 0; }
  void clear() {
    slots_.clear();
    next_ = 0;
  }
  size_t size() const { return slots_.size(); }
  uint64_t bytes() const {
    uint64_t n = 0;
    for (const auto& s : slots_)
      if (s.frames.defined()) n += static_cast<uint64_t>(s.frames.nbytes());
    return n;
  }

 private:
  std::vector<CacheSlot> slots_;
  size_t next_ = 0;
};

// --- CausalConv3d: zero padding only before the first frame, the cache's frames in front of each chunk ----------
struct CausalConv3dOptions {
  int64_t in;
  int64_t out;
  std::array<int64_t, 3> kernel;             // t, h, w
  std::array<int64_t, 3> stride{1, 1, 1};
  std::array<int64_t, 3> padding{0, 0, 0};   // symmetric in h, w; 2 * t frames before the stream
};
class CausalConv3dImpl : public torch::nn::Module {
 public:
  explicit CausalConv3dImpl(const CausalConv3dOptions& options);
  /// x [B, in, T, H, W]; `history` (optional) = frames that precede x in the stream -> [B, out, T', H', W'].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& history = {});
  /// Through the next cache slot: uses its frames as history and keeps the last kCacheFrames of the stream.
  at::Tensor forward_cached(const at::Tensor& x, FeatureCache& cache);

  CausalConv3dOptions options;
  at::Tensor weight;  // [out, in, kt, kh, kw]
  at::Tensor bias;    // [out]
};
TORCH_MODULE(CausalConv3d);

// --- RMS_norm: L2-normalise over channels, times sqrt(C) and gamma --------------------------------------------------
class RMSNormImpl : public torch::nn::Module {
 public:
  /// images: gamma [C, 1, 1] for [N, C, H, W] inputs; otherwise [C, 1, 1, 1] for [B, C, T, H, W].
  RMSNormImpl(int64_t dim, bool images);
  /// In fp32 (as upstream's autocast runs the norm), returned in fp32.
  at::Tensor forward(const at::Tensor& x);

  int64_t dim;
  at::Tensor gamma;
};
TORCH_MODULE(RMSNorm);

// --- ResidualBlock: (norm, SiLU, causal conv 3) x 2 + shortcut (1x1x1 conv when the width changes) -------------------
class ResidualBlockImpl : public torch::nn::Module {
 public:
  ResidualBlockImpl(int64_t in_dim, int64_t out_dim);
  at::Tensor forward(const at::Tensor& x, FeatureCache& cache);

  torch::nn::ModuleList residual{nullptr};  // 0 RMSNorm, 1 SiLU, 2 conv, 3 RMSNorm, 4 SiLU, 5 Dropout, 6 conv
  CausalConv3d shortcut{nullptr};           // null when in_dim == out_dim (upstream nn.Identity)
  RMSNorm norm1{nullptr}, norm2{nullptr};   // = residual[0], residual[3]
  CausalConv3d conv1{nullptr}, conv2{nullptr};  // = residual[2], residual[6]
};
TORCH_MODULE(ResidualBlock);

// --- AttentionBlock: single-head self-attention over the pixels of each frame ---------------------------------------
class AttentionBlockImpl : public torch::nn::Module {
 public:
  explicit AttentionBlockImpl(int64_t dim);
  at::Tensor forward(const at::Tensor& x);  // [B, C, T, H, W] -> same

  RMSNorm norm{nullptr};
  torch::nn::Conv2d to_qkv{nullptr};  // 1x1, C -> 3C
  torch::nn::Conv2d proj{nullptr};    // 1x1, C -> C
};
TORCH_MODULE(AttentionBlock);

// --- Resample: spatial x2 / /2 per frame, with a temporal causal conv for the 3-D modes --------------------------------
enum class ResampleMode { kUpsample2d, kUpsample3d, kDownsample2d, kDownsample3d };
class ResampleImpl : public torch::nn::Module {
 public:
  ResampleImpl(int64_t dim, ResampleMode mode);
  at::Tensor forward(const at::Tensor& x, FeatureCache& cache);

  ResampleMode mode;
  torch::nn::ModuleList resample{nullptr};  // 0: upsample / zero pad (no parameters), 1: Conv2d
  torch::nn::Conv2d conv{nullptr};          // = resample[1]
  CausalConv3d time_conv{nullptr};          // 3-D modes only

 private:
  at::Tensor spatial(const at::Tensor& x);
};
TORCH_MODULE(Resample);

/// One entry of encoder.downsamples / decoder.upsamples (exactly one member is set).
struct StageLayer {
  ResidualBlock residual{nullptr};
  AttentionBlock attention{nullptr};
  Resample resample{nullptr};
  at::Tensor forward(const at::Tensor& x, FeatureCache& cache);
};

// --- Encoder3d / Decoder3d -------------------------------------------------------------------------------------------
class Encoder3dImpl : public torch::nn::Module {
 public:
  /// z_channels = 2 z_dim (mean and log-variance).
  Encoder3dImpl(const VaeConfig& config, int64_t z_channels);
  /// One chunk of video frames [B, 3, T, H, W] -> [B, z_channels, T', H/8, W/8].
  at::Tensor forward(const at::Tensor& x, FeatureCache& cache);

  CausalConv3d conv1{nullptr};
  torch::nn::ModuleList downsamples{nullptr};
  torch::nn::ModuleList middle{nullptr};  // ResidualBlock, AttentionBlock, ResidualBlock
  torch::nn::ModuleList head{nullptr};    // RMSNorm, SiLU, CausalConv3d

 private:
  std::vector<StageLayer> layers_;
  ResidualBlock mid1_{nullptr}, mid2_{nullptr};
  AttentionBlock mid_attn_{nullptr};
  RMSNorm head_norm_{nullptr};
  CausalConv3d head_conv_{nullptr};
};
TORCH_MODULE(Encoder3d);

class Decoder3dImpl : public torch::nn::Module {
 public:
  explicit Decoder3dImpl(const VaeConfig& config);
  /// One chunk of latent frames [B, z_dim, T, h, w] (after conv2) -> video frames [B, 3, T', 8h, 8w] (not clamped).
  at::Tensor forward(const at::Tensor& x, FeatureCache& cache);

  CausalConv3d conv1{nullptr};
  torch::nn::ModuleList middle{nullptr};
  torch::nn::ModuleList upsamples{nullptr};
  torch::nn::ModuleList head{nullptr};

 private:
  std::vector<StageLayer> layers_;
  ResidualBlock mid1_{nullptr}, mid2_{nullptr};
  AttentionBlock mid_attn_{nullptr};
  RMSNorm head_norm_{nullptr};
  CausalConv3d head_conv_{nullptr};
};
TORCH_MODULE(Decoder3d);

// --- WanVAE_ ---------------------------------------------------------------------------------------------------------
class WanVaeModelImpl : public torch::nn::Module {
 public:
  explicit WanVaeModelImpl(const VaeConfig& config);

  VaeConfig config;
  Encoder3d encoder{nullptr};
  CausalConv3d conv1{nullptr};  // 1x1x1, 2 z_dim -> 2 z_dim (after the encoder)
  CausalConv3d conv2{nullptr};  // 1x1x1, z_dim -> z_dim (before the decoder)
  Decoder3d decoder{nullptr};
};
TORCH_MODULE(WanVaeModel);

/// Overwrites every parameter from a seeded CPU generator: conv weights N(0,1)/sqrt(fan_in), biases 0.05 N,
/// gammas 1 + 0.1 N.
void randomize_parameters(torch::nn::Module& module, uint64_t seed);

}  // namespace liveavatar::vae
