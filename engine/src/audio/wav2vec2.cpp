// wav2vec2 modules: conv feature extractor with layer norm, feature projection, weight-normed positional conv,
// pre-LN ("stable layer norm") transformer encoder returning every hidden state.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "wav2vec2.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>

#include "weights/weights.h"

namespace liveavatar::audio {
namespace {

torch::nn::LayerNorm make_layer_norm(int64_t dim, double eps) {
  return torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(eps));
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

ConvLayerImpl::ConvLayerImpl(int64_t in, int64_t out, int64_t kernel, int64_t stride, bool bias, double eps) {
  conv = register_module("conv", torch::nn::Conv1d(torch::nn::Conv1dOptions(in, out, kernel).stride(stride).bias(bias)));
  layer_norm = register_module("layer_norm", make_layer_norm(out, eps));
}

at::Tensor ConvLayerImpl::forward(const at::Tensor& x) {
  auto y = conv(x);                                       // [B, C, T]
  y = layer_norm(y.transpose(-2, -1)).transpose(-2, -1);  // normalised over channels
  return at::gelu(y);
}

FeatureEncoderImpl::FeatureEncoderImpl(const Wav2Vec2Config& c) {
  conv_layers = register_module("conv_layers", torch::nn::ModuleList());
  int64_t in = 1;
  for (size_t i = 0; i < c.conv_dim.size(); ++i) {
    // HF's LayerNorm here keeps nn.LayerNorm's default eps (1e-5), not config.layer_norm_eps.
    conv_layers->push_back(ConvLayer(in, c.conv_dim[i], c.conv_kernel[i], c.conv_stride[i], c.conv_bias, 1e-5));
    in = c.conv_dim[i];
  }
}

at::Tensor FeatureEncoderImpl::forward(const at::Tensor& samples) {
  auto x = samples.unsqueeze(1);  // [B, 1, N]
  for (const auto& layer : *conv_layers) x = layer->as<ConvLayerImpl>()->forward(x);
  return x;  // [B, C, T]
}

FeatureProjectionImpl::FeatureProjectionImpl(const Wav2Vec2Config& c) {
  layer_norm = register_module("layer_norm", make_layer_norm(c.conv_dim.back(), c.layer_norm_eps));
  projection = register_module("projection", torch::nn::Linear(c.conv_dim.back(), c.hidden_size));
}

at::Tensor FeatureProjectionImpl::forward(const at::Tensor& x) { return projection(layer_norm(x)); }

WeightNormConvImpl::WeightNormConvImpl(int64_t channels, int64_t kernel, int64_t groups_) : groups(groups_) {
  weight_g = register_parameter("weight_g", at::ones({1, 1, kernel}));
  weight_v = register_parameter("weight_v", at::zeros({channels, channels / groups, kernel}));
  bias = register_parameter("bias", at::zeros({channels}));
}

at::Tensor WeightNormConvImpl::weight() const {
  // torch weight_norm(dim=2): the norm runs over every dim except 2, one norm per kernel tap.
  const auto v = weight_v.to(at::kFloat);
  const auto norm = v.pow(2).sum(at::IntArrayRef{0, 1}, /*keepdim=*/true).sqrt();  // [1, 1, K]
  return (v * (weight_g.to(at::kFloat) / norm)).to(weight_v.scalar_type());
}

PositionalConvImpl::PositionalConvImpl(const Wav2Vec2Config& c) : kernel(c.num_conv_pos_embeddings) {
  conv = register_module("conv", WeightNormConv(c.hidden_size, c.num_conv_pos_embeddings,
                                                c.num_conv_pos_embedding_groups));
}

at::Tensor PositionalConvImpl::forward(const at::Tensor& x) {
  const auto xc = x.transpose(1, 2);  // [B, C, T]
  auto y = at::conv1d(xc, conv->weight(), conv->bias, /*stride=*/{1}, /*padding=*/{kernel / 2}, /*dilation=*/{1},
                      conv->groups);  // [B, C, T + 1] for even K
  if (kernel % 2 == 0) y = y.slice(2, 0, y.size(2) - 1);
  return at::gelu(y).transpose(1, 2);
}

AttentionImpl::AttentionImpl(int64_t dim, int64_t heads_) : heads(heads_) {
  q_proj = register_module("q_proj", torch::nn::Linear(dim, dim));
  k_proj = register_module("k_proj", torch::nn::Linear(dim, dim));
  v_proj = register_module("v_proj", torch::nn::Linear(dim, dim));
  out_proj = register_module("out_proj", torch::nn::Linear(dim, dim));
}

at::Tensor AttentionImpl::forward(const at::Tensor& x) {
  const int64_t b = x.size(0), t = x.size(1), d = x.size(2) / heads;
  auto split = [&](const at::Tensor& y) { return y.view({b, t, heads, d}).transpose(1, 2); };  // [B, H, T, D]
  const auto o = at::scaled_dot_product_attention(split(q_proj(x)), split(k_proj(x)), split(v_proj(x)));
  return out_proj(o.transpose(1, 2).reshape({b, t, heads * d}));
}

FeedForwardImpl::FeedForwardImpl(int64_t dim, int64_t inner) {
  intermediate_dense = register_module("intermediate_dense", torch::nn::Linear(dim, inner));
  output_dense = register_module("output_dense", torch::nn::Linear(inner, dim));
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) { return output_dense(at::gelu(intermediate_dense(x))); }

EncoderLayerImpl::EncoderLayerImpl(const Wav2Vec2Config& c) {
  attention = register_module("attention", Attention(c.hidden_size, c.num_attention_heads));
  layer_norm = register_module("layer_norm", make_layer_norm(c.hidden_size, c.layer_norm_eps));
  feed_forward = register_module("feed_forward", FeedForward(c.hidden_size, c.intermediate_size));
  final_layer_norm = register_module("final_layer_norm", make_layer_norm(c.hidden_size, c.layer_norm_eps));
}

at::Tensor EncoderLayerImpl::forward(const at::Tensor& x) {
  auto h = x + attention(layer_norm(x));
  return h + feed_forward(final_layer_norm(h));
}

EncoderImpl::EncoderImpl(const Wav2Vec2Config& c) {
  pos_conv_embed = register_module("pos_conv_embed", PositionalConv(c));
  layer_norm = register_module("layer_norm", make_layer_norm(c.hidden_size, c.layer_norm_eps));
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_hidden_layers; ++i) layers->push_back(EncoderLayer(c));
}

std::vector<at::Tensor> EncoderImpl::forward(const at::Tensor& x) {
  std::vector<at::Tensor> states;
  auto h = x + pos_conv_embed(x);
  for (const auto& layer : *layers) {
    states.push_back(h);  // the state entering each layer
    h = layer->as<EncoderLayerImpl>()->forward(h);
  }
  states.push_back(layer_norm(h));  // the last one after the final norm
  return states;
}

Wav2Vec2ModelImpl::Wav2Vec2ModelImpl(const Wav2Vec2Config& c) : config(c) {
  c.validate();
  feature_extractor = register_module("feature_extractor", FeatureEncoder(c));
  feature_projection = register_module("feature_projection", FeatureProjection(c));
  encoder = register_module("encoder", Encoder(c));
}

std::vector<at::Tensor> Wav2Vec2ModelImpl::forward(const at::Tensor& input_values) {
  const auto features = feature_extractor(input_values).transpose(1, 2);  // [B, T, C]
  return encoder(feature_projection(features));
}

weights::Checkpoint map_hf_checkpoint(const weights::Checkpoint& in) {
  weights::Checkpoint out;
  out.metadata = in.metadata;
  out.files = in.files;
  const std::string prefix = "wav2vec2.";
  const std::string g_old = "parametrizations.weight.original0", v_old = "parametrizations.weight.original1";
  for (const auto& [key, tensor] : in.tensors) {
    std::string k = key.rfind(prefix, 0) == 0 ? key.substr(prefix.size()) : key;
    // Not used for hidden states: the CTC head and the SpecAugment mask vector (training only).
    if (k.rfind("lm_head.", 0) == 0 || k == "masked_spec_embed") continue;
    if (ends_with(k, g_old)) k = k.substr(0, k.size() - g_old.size()) + "weight_g";
    else if (ends_with(k, v_old)) k = k.substr(0, k.size() - v_old.size()) + "weight_v";
    out.tensors[k] = tensor;
    const auto src = in.source.find(key);
    if (src != in.source.end()) out.source[k] = src->second;
  }
  return out;
}

void randomize_parameters(torch::nn::Module& module, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  for (auto& item : module.named_parameters(/*recurse=*/true)) {
    auto& p = item.value();
    auto values = at::empty(p.sizes(), at::kFloat);
    const bool norm_scale = ends_with(item.key(), "layer_norm.weight") || ends_with(item.key(), "weight_g");
    if (p.dim() <= 1 || norm_scale) {
      values.normal_(0.0, 0.1, gen);
      if (norm_scale) values.add_(1.0);
    } else {
      values.normal_(0.0, 0.02, gen);
    }
    p.copy_(values);
  }
}

}  // namespace liveavatar::audio
