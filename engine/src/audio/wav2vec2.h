// wav2vec2 module tree (HF Wav2Vec2Model with feat_extract_norm="layer", do_stable_layer_norm=True). Submodule and
// parameter names are the HF state dict names without the "wav2vec2." prefix, so loading is a name match.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include "audio/audio_encoder.h"

namespace liveavatar::audio {

// --- feature_extractor.conv_layers.N (Wav2Vec2LayerNormConvLayer): conv -> LayerNorm over channels -> GELU ------
class ConvLayerImpl : public torch::nn::Module {
 public:
  ConvLayerImpl(int64_t in, int64_t out, int64_t kernel, int64_t stride, bool bias, double eps);
  at::Tensor forward(const at::Tensor& x);  // [B, C_in, T] -> [B, C_out, T']
  torch::nn::Conv1d conv{nullptr};
  torch::nn::LayerNorm layer_norm{nullptr};
};
TORCH_MODULE(ConvLayer);

class FeatureEncoderImpl : public torch::nn::Module {
 public:
  explicit FeatureEncoderImpl(const Wav2Vec2Config& config);
  at::Tensor forward(const at::Tensor& samples);  // [B, N] -> [B, conv_dim[-1], T]
  torch::nn::ModuleList conv_layers{nullptr};
};
TORCH_MODULE(FeatureEncoder);

// --- feature_projection: LayerNorm(conv_dim[-1]) -> Linear(conv_dim[-1], hidden) --------------------------------
class FeatureProjectionImpl : public torch::nn::Module {
 public:
  explicit FeatureProjectionImpl(const Wav2Vec2Config& config);
  at::Tensor forward(const at::Tensor& x);  // [B, T, C] -> [B, T, hidden]
  torch::nn::LayerNorm layer_norm{nullptr};
  torch::nn::Linear projection{nullptr};
};
TORCH_MODULE(FeatureProjection);

// --- encoder.pos_conv_embed.conv: grouped Conv1d with weight norm over dim 2 (weight = g * v / ||v||) ------------
class WeightNormConvImpl : public torch::nn::Module {
 public:
  WeightNormConvImpl(int64_t channels, int64_t kernel, int64_t groups);
  /// The effective weight [C, C / groups, K]: weight_v scaled per kernel tap by weight_g / ||weight_v[:, :, k]||.
  at::Tensor weight() const;
  at::Tensor weight_g;  // [1, 1, K]
  at::Tensor weight_v;  // [C, C / groups, K]
  at::Tensor bias;      // [C]
  int64_t groups;
};
TORCH_MODULE(WeightNormConv);

/// Wav2Vec2PositionalConvEmbedding: conv (padding K / 2), drop the last frame when K is even, GELU.
class PositionalConvImpl : public torch::nn::Module {
 public:
  explicit PositionalConvImpl(const Wav2Vec2Config& config);
  at::Tensor forward(const at::Tensor& x);  // [B, T, C] -> [B, T, C]
  WeightNormConv conv{nullptr};
  int64_t kernel;
};
TORCH_MODULE(PositionalConv);

// --- encoder.layers.N (Wav2Vec2EncoderLayerStableLayerNorm) ------------------------------------------------------
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(int64_t dim, int64_t heads);
  at::Tensor forward(const at::Tensor& x);  // [B, T, C]: full (bidirectional) self-attention, no mask
  torch::nn::Linear q_proj{nullptr}, k_proj{nullptr}, v_proj{nullptr}, out_proj{nullptr};
  int64_t heads;
};
TORCH_MODULE(Attention);

class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(int64_t dim, int64_t inner);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::Linear intermediate_dense{nullptr}, output_dense{nullptr};
};
TORCH_MODULE(FeedForward);

class EncoderLayerImpl : public torch::nn::Module {
 public:
  explicit EncoderLayerImpl(const Wav2Vec2Config& config);
  at::Tensor forward(const at::Tensor& x);  // x + attn(LN(x)); then + ffn(LN(.))
  Attention attention{nullptr};
  torch::nn::LayerNorm layer_norm{nullptr};
  FeedForward feed_forward{nullptr};
  torch::nn::LayerNorm final_layer_norm{nullptr};
};
TORCH_MODULE(EncoderLayer);

class EncoderImpl : public torch::nn::Module {
 public:
  explicit EncoderImpl(const Wav2Vec2Config& config);
  /// [B, T, C] projected features -> all hidden states, each [B, T, C] (layers + 1 of them).
  std::vector<at::Tensor> forward(const at::Tensor& x);
  PositionalConv pos_conv_embed{nullptr};
  torch::nn::LayerNorm layer_norm{nullptr};
  torch::nn::ModuleList layers{nullptr};
};
TORCH_MODULE(Encoder);

class Wav2Vec2ModelImpl : public torch::nn::Module {
 public:
  explicit Wav2Vec2ModelImpl(const Wav2Vec2Config& config);
  /// Normalised input values [B, N] -> hidden states [layers + 1] x [B, T, hidden].
  std::vector<at::Tensor> forward(const at::Tensor& input_values);
  Wav2Vec2Config config;
  FeatureEncoder feature_extractor{nullptr};
  FeatureProjection feature_projection{nullptr};
  Encoder encoder{nullptr};
};

class Wav2Vec2Model : public torch::nn::ModuleHolder<Wav2Vec2ModelImpl> {
 public:
  using torch::nn::ModuleHolder<Wav2Vec2ModelImpl>::ModuleHolder;
};

/// HF state dict -> our names (the one table of renamed / dropped keys, see AudioEncoder::load).
weights::Checkpoint map_hf_checkpoint(const weights::Checkpoint& checkpoint);

/// Seeded N(0, 0.02) weights (N(0, 0.1) for vectors, 1 + N(0, 0.1) for norm scales) for tests and benches.
void randomize_parameters(torch::nn::Module& module, uint64_t seed);

}  // namespace liveavatar::audio
