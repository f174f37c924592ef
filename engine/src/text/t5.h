// umT5 encoder module tree (upstream T5Encoder with shared_pos=False). Submodule and parameter names are the keys of
// models_t5_umt5-xxl-enc-bf16.pth, so loading is a name match. Parameters are allocated uninitialised in the model
// dtype (no fp32 staging, no init pass over 5.7 B weights): loading assigns the checkpoint tensors.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/pimpl.h>

#include "text/text_encoder.h"

namespace liveavatar::text {

/// A bias-free linear or an embedding table: one "weight" parameter.
class WeightImpl : public torch::nn::Module {
 public:
  WeightImpl(std::vector<int64_t> shape, c10::ScalarType dtype);
  at::Tensor weight;
};
TORCH_MODULE(Weight);

/// T5LayerNorm: weight * x * rsqrt(mean(x^2) + eps), the statistic in fp32.
class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps, c10::ScalarType dtype);
  at::Tensor forward(const at::Tensor& x);
  at::Tensor weight;
  double eps;
};
TORCH_MODULE(RMSNorm);

/// T5Attention (no 1/sqrt(d) scaling): q, k, v, o without bias.
class AttentionImpl : public torch::nn::Module {
 public:
  AttentionImpl(const T5Config& config, c10::ScalarType dtype);
  /// x [B, L, dim], bias [B or 1, H, L, L] (position bias with the key mask already applied) -> [B, L, dim].
  at::Tensor forward(const at::Tensor& x, const at::Tensor& bias);
  Weight q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
  int64_t num_heads;
};
TORCH_MODULE(Attention);

/// T5FeedForward: fc2(fc1(x) * gelu_tanh(gate.0(x))).
class FeedForwardImpl : public torch::nn::Module {
 public:
  FeedForwardImpl(const T5Config& config, c10::ScalarType dtype);
  at::Tensor forward(const at::Tensor& x);
  torch::nn::ModuleList gate{nullptr};  // gate.0: the gate projection (upstream: Sequential(Linear, GELU))
  Weight fc1{nullptr}, fc2{nullptr};
};
TORCH_MODULE(FeedForward);

/// T5RelativeEmbedding (bidirectional): one table [num_buckets, heads] per layer in umT5.
class RelativeEmbeddingImpl : public torch::nn::Module {
 public:
  RelativeEmbeddingImpl(const T5Config& config, c10::ScalarType dtype);
  /// Bias [1, H, L, L] for bucket indices [L, L].
  at::Tensor forward(const at::Tensor& buckets);
  Weight embedding{nullptr};
};
TORCH_MODULE(RelativeEmbedding);

/// Bucket index of every (query i, key j) pair, rel = j - i, as T5RelativeEmbedding._relative_position_bucket.
at::Tensor relative_position_buckets(int64_t length, int64_t num_buckets, int64_t max_dist);

class BlockImpl : public torch::nn::Module {
 public:
  BlockImpl(const T5Config& config, c10::ScalarType dtype);
  /// x [B, L, dim]; buckets [L, L]; key_mask [B, L] (1 = token) or undefined.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& buckets, const at::Tensor& key_mask);
  RMSNorm norm1{nullptr};
  Attention attn{nullptr};
  RMSNorm norm2{nullptr};
  FeedForward ffn{nullptr};
  RelativeEmbedding pos_embedding{nullptr};
};
TORCH_MODULE(Block);

class T5EncoderImpl : public torch::nn::Module {
 public:
  T5EncoderImpl(const T5Config& config, c10::ScalarType dtype);
  /// ids [B, L] int64, mask [B, L] (1 = token) or undefined -> [B, L, dim] in the model dtype.
  /// `between_layers`, when set, is called before each block; it may throw to stop the pass (a cancelled load).
  at::Tensor forward(const at::Tensor& ids, const at::Tensor& mask, const std::function<void()>& between_layers = {});
  T5Config config;
  Weight token_embedding{nullptr};
  torch::nn::ModuleList blocks{nullptr};
  RMSNorm norm{nullptr};
};

class T5Encoder : public torch::nn::ModuleHolder<T5EncoderImpl> {
 public:
  using torch::nn::ModuleHolder<T5EncoderImpl>::ModuleHolder;
};

/// Seeded weights like upstream's init_weights scales (normal with the fan-in based std; norms 1 + N(0, 0.1)).
void randomize_parameters(T5EncoderImpl& module, uint64_t seed);

}  // namespace liveavatar::text
