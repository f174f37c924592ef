// Wan2.1 VAE layers: causal conv, RMS norm, residual / attention blocks, resamplers, encoder and decoder.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "modules.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/linear.h>

#include <cmath>

namespace liveavatar::vae {
namespace {

/// The last kCacheFrames frames of the stream [history ; x], copied so the chunk can be freed.
at::Tensor stream_tail(const at::Tensor& history, const at::Tensor& x) {
  const int64_t t = x.size(2);
  if (t >= kCacheFrames || !history.defined()) return x.slice(2, std::max<int64_t>(t - kCacheFrames, 0)).clone();
  const int64_t need = kCacheFrames - t;
  const int64_t h = history.size(2);
  return at::cat({history.slice(2, std::max<int64_t>(h - need, 0)), x}, 2);
}

/// [B, C, T, H, W] <-> [B * T, C, H, W] (einops 'b c t h w -> (b t) c h w').
at::Tensor frames_to_batch(const at::Tensor& x) {
  return x.permute({0, 2, 1, 3, 4}).reshape({x.size(0) * x.size(2), x.size(1), x.size(3), x.size(4)});
}
at::Tensor batch_to_frames(const at::Tensor& x, int64_t t) {
  return x.view({x.size(0) / t, t, x.size(1), x.size(2), x.size(3)}).permute({0, 2, 1, 3, 4});
}

at::Tensor conv2d_as_weight(const torch::nn::Conv2dImpl& conv, const at::Tensor& x) {
  const auto& w = conv.weight;
  return at::conv2d(x.to(w.scalar_type()), w, conv.bias, conv.options.stride(),
                    std::get<torch::ExpandingArray<2>>(conv.options.padding()));
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// CausalConv3d
// ---------------------------------------------------------------------------------------------------------------
CausalConv3dImpl::CausalConv3dImpl(const CausalConv3dOptions& opts) : options(opts) {
  const auto& k = opts.kernel;
  weight = register_parameter("weight", at::empty({opts.out, opts.in, k[0], k[1], k[2]}));
  bias = register_parameter("bias", at::zeros({opts.out}));
}

at::Tensor CausalConv3dImpl::forward(const at::Tensor& input, const at::Tensor& history) {
  auto x = input.to(weight.scalar_type());
  int64_t front = 2 * options.padding[0];
  if (history.defined() && front > 0) {
    x = at::cat({history.to(x.scalar_type()), x}, 2);
    front -= history.size(2);
  }
  const int64_t ph = options.padding[1], pw = options.padding[2];
  if (front > 0 || ph > 0 || pw > 0) x = at::constant_pad_nd(x, {pw, pw, ph, ph, front, 0}, 0);
  const auto& s = options.stride;
  return at::conv3d(x, weight, bias, {s[0], s[1], s[2]});
}

at::Tensor CausalConv3dImpl::forward_cached(const at::Tensor& input, FeatureCache& cache) {
  CacheSlot& slot = cache.take();
  const auto x = input.to(weight.scalar_type());
  auto tail = stream_tail(slot.frames, x);
  auto out = forward(x, slot.frames);
  slot.started = true;
  slot.frames = std::move(tail);
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// RMS_norm: F.normalize(x, dim=1) * sqrt(C) * gamma (no bias)
// ---------------------------------------------------------------------------------------------------------------
RMSNormImpl::RMSNormImpl(int64_t d, bool images) : dim(d) {
  gamma = register_parameter("gamma", images ? at::ones({d, 1, 1}) : at::ones({d, 1, 1, 1}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& input) {
  const auto x = input.to(at::kFloat);
  const auto denom = at::norm(x, 2, {1}, /*keepdim=*/true).clamp_min(1e-12);
  return x / denom * std::sqrt(static_cast<double>(dim)) * gamma.to(at::kFloat);
}

// ---------------------------------------------------------------------------------------------------------------
// ResidualBlock
// ---------------------------------------------------------------------------------------------------------------
ResidualBlockImpl::ResidualBlockImpl(int64_t in_dim, int64_t out_dim) {
  norm1 = RMSNorm(in_dim, /*images=*/false);
  conv1 = CausalConv3d(CausalConv3dOptions{in_dim, out_dim, {3, 3, 3}, {1, 1, 1}, {1, 1, 1}});
  norm2 = RMSNorm(out_dim, /*images=*/false);
  conv2 = CausalConv3d(CausalConv3dOptions{out_dim, out_dim, {3, 3, 3}, {1, 1, 1}, {1, 1, 1}});
  residual = register_module("residual", torch::nn::ModuleList(norm1, torch::nn::SiLU(), conv1, norm2,
                                                               torch::nn::SiLU(), torch::nn::Dropout(0.0), conv2));
  if (in_dim != out_dim)
    shortcut = register_module("shortcut", CausalConv3d(CausalConv3dOptions{in_dim, out_dim, {1, 1, 1}}));
}

at::Tensor ResidualBlockImpl::forward(const at::Tensor& x, FeatureCache& cache) {
  const auto h = shortcut ? shortcut->forward(x) : x;
  auto y = conv1->forward_cached(at::silu(norm1->forward(x)), cache);
  y = conv2->forward_cached(at::silu(norm2->forward(y)), cache);  // dropout 0 in eval
  return y + h;
}

// ---------------------------------------------------------------------------------------------------------------
// AttentionBlock (one head over the H * W pixels of each frame)
// ---------------------------------------------------------------------------------------------------------------
AttentionBlockImpl::AttentionBlockImpl(int64_t dim) {
  norm = register_module("norm", RMSNorm(dim, /*images=*/true));
  to_qkv = register_module("to_qkv", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, dim * 3, 1)));
  proj = register_module("proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(dim, dim, 1)));
}

at::Tensor AttentionBlockImpl::forward(const at::Tensor& x) {
  const int64_t b = x.size(0), c = x.size(1), t = x.size(2), h = x.size(3), w = x.size(4);
  const auto frames = frames_to_batch(x);                                  // [BT, C, H, W]
  const auto qkv = conv2d_as_weight(*to_qkv, norm->forward(frames))        // [BT, 3C, H, W]
                       .reshape({b * t, 1, c * 3, h * w})
                       .permute({0, 1, 3, 2})
                       .contiguous()
                       .chunk(3, -1);                                      // 3 x [BT, 1, HW, C]
  auto y = at::scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]);      // [BT, 1, HW, C]
  y = y.squeeze(1).permute({0, 2, 1}).reshape({b * t, c, h, w});
  y = conv2d_as_weight(*proj, y);
  return batch_to_frames(y, t) + x;
}

// ---------------------------------------------------------------------------------------------------------------
// Resample
// ---------------------------------------------------------------------------------------------------------------
ResampleImpl::ResampleImpl(int64_t dim, ResampleMode m) : mode(m) {
  using torch::nn::Conv2dOptions;
  const bool up = m == ResampleMode::kUpsample2d || m == ResampleMode::kUpsample3d;
  conv = up ? torch::nn::Conv2d(Conv2dOptions(dim, dim / 2, 3).padding(1))
            : torch::nn::Conv2d(Conv2dOptions(dim, dim, 3).stride(2));
  resample = register_module("resample", torch::nn::ModuleList(torch::nn::Identity(), conv));
  if (m == ResampleMode::kUpsample3d)
    time_conv = register_module(
        "time_conv", CausalConv3d(CausalConv3dOptions{dim, dim * 2, {3, 1, 1}, {1, 1, 1}, {1, 0, 0}}));
  else if (m == ResampleMode::kDownsample3d)
    time_conv = register_module("time_conv", CausalConv3d(CausalConv3dOptions{dim, dim, {3, 1, 1}, {2, 1, 1}}));
}

at::Tensor ResampleImpl::spatial(const at::Tensor& x) {
  auto f = frames_to_batch(x);  // [BT, C, H, W]
  if (mode == ResampleMode::kUpsample2d || mode == ResampleMode::kUpsample3d) {
    // nearest-exact x2, computed in fp32 (upstream's bf16 workaround)
    const std::vector<double> scales{2.0, 2.0};
    f = at::_upsample_nearest_exact2d(f.to(at::kFloat), std::nullopt, scales).to(x.scalar_type());
  } else {
    f = at::constant_pad_nd(f, {0, 1, 0, 1}, 0);  // right and bottom only
  }
  return batch_to_frames(conv2d_as_weight(*conv, f), x.size(2));
}

at::Tensor ResampleImpl::forward(const at::Tensor& input, FeatureCache& cache) {
  at::Tensor x = input;
  if (mode == ResampleMode::kUpsample3d) {
    CacheSlot& slot = cache.take();
    if (!slot.started) {
      // The stream's first chunk is not doubled in time: it goes straight to the spatial upsampler.
      slot.started = true;
    } else {
      // From the second chunk on, each frame becomes two (the two halves of time_conv's output channels),
      // the temporal conv seeing zeros before the second chunk of the stream.
      x = x.to(time_conv->weight.scalar_type());
      auto history = slot.frames;
      if (!history.defined()) history = at::zeros_like(x.slice(2, 0, 1));
      auto tail = stream_tail(history, x);
      const auto y = time_conv->forward(x, slot.frames);  // [B, 2C, T, H, W]
      slot.frames = std::move(tail);
      const int64_t b = x.size(0), c = x.size(1), t = x.size(2), h = x.size(3), w = x.size(4);
      const auto halves = y.reshape({b, 2, c, t, h, w});
      x = at::stack({halves.select(1, 0), halves.select(1, 1)}, 3).reshape({b, c, t * 2, h, w});
    }
  }
  x = spatial(x);
  if (mode == ResampleMode::kDownsample3d) {
    CacheSlot& slot = cache.take();
    if (!slot.started) {
      // The first chunk (one frame) passes without temporal reduction; it is kept as the next chunk's history.
      slot.started = true;
      slot.frames = x.clone();
    } else {
      const auto tail = x.slice(2, x.size(2) - 1).clone();
      const auto& prev = slot.frames;
      x = time_conv->forward(at::cat({prev.slice(2, prev.size(2) - 1).to(x.scalar_type()), x}, 2));
      slot.frames = tail;
    }
  }
  return x;
}

at::Tensor StageLayer::forward(const at::Tensor& x, FeatureCache& cache) {
  if (residual) return residual->forward(x, cache);
  if (attention) return attention->forward(x);
  return resample->forward(x, cache);
}

// ---------------------------------------------------------------------------------------------------------------
// Encoder3d
// ---------------------------------------------------------------------------------------------------------------
namespace {
void build_middle(torch::nn::ModuleList& list, int64_t dim, ResidualBlock& a, AttentionBlock& attn, ResidualBlock& b) {
  a = ResidualBlock(dim, dim);
  attn = AttentionBlock(dim);
  b = ResidualBlock(dim, dim);
  list->push_back(a);
  list->push_back(attn);
  list->push_back(b);
}

bool contains(const std::vector<double>& v, double x) {
  for (double s : v)
    if (s == x) return true;
  return false;
}
}  // namespace

Encoder3dImpl::Encoder3dImpl(const VaeConfig& cfg, int64_t z_channels) {
  std::vector<int64_t> dims{cfg.dim};
  for (int64_t m : cfg.dim_mult) dims.push_back(cfg.dim * m);
  double scale = 1.0;
  conv1 = register_module("conv1", CausalConv3d(CausalConv3dOptions{3, dims[0], {3, 3, 3}, {1, 1, 1}, {1, 1, 1}}));
  downsamples = torch::nn::ModuleList();
  const size_t levels = cfg.dim_mult.size();
  for (size_t i = 0; i < levels; ++i) {
    int64_t in_dim = dims[i];
    const int64_t out_dim = dims[i + 1];
    for (int64_t r = 0; r < cfg.num_res_blocks; ++r) {
      StageLayer layer;
      layer.residual = ResidualBlock(in_dim, out_dim);
      downsamples->push_back(layer.residual);
      layers_.push_back(layer);
      if (contains(cfg.attn_scales, scale)) {
        StageLayer attn;
        attn.attention = AttentionBlock(out_dim);
        downsamples->push_back(attn.attention);
        layers_.push_back(attn);
      }
      in_dim = out_dim;
    }
    if (i + 1 != levels) {
      StageLayer layer;
      layer.resample = Resample(out_dim, cfg.temperal_downsample[i] ? ResampleMode::kDownsample3d
                                                                    : ResampleMode::kDownsample2d);
      downsamples->push_back(layer.resample);
      layers_.push_back(layer);
      scale /= 2.0;
    }
  }
  register_module("downsamples", downsamples);
  const int64_t top = dims.back();
  middle = torch::nn::ModuleList();
  build_middle(middle, top, mid1_, mid_attn_, mid2_);
  register_module("middle", middle);
  head_norm_ = RMSNorm(top, /*images=*/false);
  head_conv_ = CausalConv3d(CausalConv3dOptions{top, z_channels, {3, 3, 3}, {1, 1, 1}, {1, 1, 1}});
  head = register_module("head", torch::nn::ModuleList(head_norm_, torch::nn::SiLU(), head_conv_));
}

at::Tensor Encoder3dImpl::forward(const at::Tensor& input, FeatureCache& cache) {
  auto x = conv1->forward_cached(input, cache);
  for (auto& layer : layers_) x = layer.forward(x, cache);
  x = mid1_->forward(x, cache);
  x = mid_attn_->forward(x);
  x = mid2_->forward(x, cache);
  return head_conv_->forward_cached(at::silu(head_norm_->forward(x)), cache);
}

// ---------------------------------------------------------------------------------------------------------------
// Decoder3d
// ---------------------------------------------------------------------------------------------------------------
Decoder3dImpl::Decoder3dImpl(const VaeConfig& cfg) {
  const size_t levels = cfg.dim_mult.size();
  std::vector<int64_t> dims{cfg.dim * cfg.dim_mult.back()};
  for (size_t i = levels; i-- > 0;) dims.push_back(cfg.dim * cfg.dim_mult[i]);
  double scale = 1.0 / std::pow(2.0, static_cast<double>(levels) - 2.0);
  std::vector<bool> temporal_up(cfg.temperal_downsample.rbegin(), cfg.temperal_downsample.rend());

  conv1 = register_module("conv1",
                          CausalConv3d(CausalConv3dOptions{cfg.z_dim, dims[0], {3, 3, 3}, {1, 1, 1}, {1, 1, 1}}));
  middle = torch::nn::ModuleList();
  build_middle(middle, dims[0], mid1_, mid_attn_, mid2_);
  register_module("middle", middle);
  upsamples = torch::nn::ModuleList();
  for (size_t i = 0; i < levels; ++i) {
    int64_t in_dim = dims[i];
    const int64_t out_dim = dims[i + 1];
    // Levels after the first receive the halved width of the previous upsampler (upstream tests i in {1, 2, 3}).
    if (i == 1 || i == 2 || i == 3) in_dim /= 2;
    for (int64_t r = 0; r < cfg.num_res_blocks + 1; ++r) {
      StageLayer layer;
      layer.residual = ResidualBlock(in_dim, out_dim);
      upsamples->push_back(layer.residual);
      layers_.push_back(layer);
      if (contains(cfg.attn_scales, scale)) {
        StageLayer attn;
        attn.attention = AttentionBlock(out_dim);
        upsamples->push_back(attn.attention);
        layers_.push_back(attn);
      }
      in_dim = out_dim;
    }
    if (i + 1 != levels) {
      StageLayer layer;
      layer.resample = Resample(out_dim, temporal_up[i] ? ResampleMode::kUpsample3d : ResampleMode::kUpsample2d);
      upsamples->push_back(layer.resample);
      layers_.push_back(layer);
      scale *= 2.0;
    }
  }
  register_module("upsamples", upsamples);
  const int64_t last = dims.back();
  head_norm_ = RMSNorm(last, /*images=*/false);
  head_conv_ = CausalConv3d(CausalConv3dOptions{last, 3, {3, 3, 3}, {1, 1, 1}, {1, 1, 1}});
  head = register_module("head", torch::nn::ModuleList(head_norm_, torch::nn::SiLU(), head_conv_));
}

at::Tensor Decoder3dImpl::forward(const at::Tensor& input, FeatureCache& cache) {
  auto x = conv1->forward_cached(input, cache);
  x = mid1_->forward(x, cache);
  x = mid_attn_->forward(x);
  x = mid2_->forward(x, cache);
  for (auto& layer : layers_) x = layer.forward(x, cache);
  return head_conv_->forward_cached(at::silu(head_norm_->forward(x)), cache);
}

// ---------------------------------------------------------------------------------------------------------------
// WanVAE_
// ---------------------------------------------------------------------------------------------------------------
WanVaeModelImpl::WanVaeModelImpl(const VaeConfig& cfg) : config(cfg) {
  config.validate();
  const int64_t z = cfg.z_dim;
  encoder = register_module("encoder", Encoder3d(cfg, z * 2));
  conv1 = register_module("conv1", CausalConv3d(CausalConv3dOptions{z * 2, z * 2, {1, 1, 1}}));
  conv2 = register_module("conv2", CausalConv3d(CausalConv3dOptions{z, z, {1, 1, 1}}));
  decoder = register_module("decoder", Decoder3d(cfg));
}

void randomize_parameters(torch::nn::Module& module, uint64_t seed) {
  at::NoGradGuard no_grad;
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  for (auto& item : module.named_parameters(/*recurse=*/true)) {
    auto& p = item.value();
    const std::string& name = item.key();
    at::Tensor v;
    if (name.size() >= 5 && name.compare(name.size() - 5, 5, "gamma") == 0) {
      v = 1.0 + 0.1 * at::randn(p.sizes(), gen, at::kFloat);
    } else if (p.dim() <= 1) {
      v = 0.05 * at::randn(p.sizes(), gen, at::kFloat);
    } else {
      const double fan_in = static_cast<double>(p.numel() / p.size(0));
      v = at::randn(p.sizes(), gen, at::kFloat) / std::sqrt(fan_in);
    }
    p.copy_(v);
  }
}

}  // namespace liveavatar::vae
