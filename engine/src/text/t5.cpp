// umT5 encoder modules: RMS norms, unscaled attention with a per-layer relative position bias, gated-GELU FFN.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "t5.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>

#include <cmath>
#include <limits>

namespace liveavatar::text {
namespace {

// fp16 only: clamp infinities back into range (upstream fp16_clamp).
at::Tensor fp16_clamp(const at::Tensor& x) {
  if (x.scalar_type() != at::kHalf || !at::isinf(x).any().item<bool>()) return x;
  const double limit = 65504.0 - 1000.0;
  return at::clamp(x, -limit, limit);
}

}  // namespace

WeightImpl::WeightImpl(std::vector<int64_t> shape, c10::ScalarType dtype) {
  weight = register_parameter("weight", at::empty(shape, at::TensorOptions().dtype(dtype)), /*requires_grad=*/false);
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_, c10::ScalarType dtype) : eps(eps_) {
  weight = register_parameter("weight", at::ones({dim}, at::TensorOptions().dtype(dtype)), /*requires_grad=*/false);
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  auto y = x * at::rsqrt(x.to(at::kFloat).pow(2).mean(-1, /*keepdim=*/true) + eps);  // promotes to fp32
  if (weight.scalar_type() == at::kHalf || weight.scalar_type() == at::kBFloat16) y = y.to(weight.scalar_type());
  return weight * y;
}

AttentionImpl::AttentionImpl(const T5Config& c, c10::ScalarType dtype) : num_heads(c.num_heads) {
  q = register_module("q", Weight(std::vector<int64_t>{c.dim_attn, c.dim}, dtype));
  k = register_module("k", Weight(std::vector<int64_t>{c.dim_attn, c.dim}, dtype));
  v = register_module("v", Weight(std::vector<int64_t>{c.dim_attn, c.dim}, dtype));
  o = register_module("o", Weight(std::vector<int64_t>{c.dim, c.dim_attn}, dtype));
}

at::Tensor AttentionImpl::forward(const at::Tensor& x, const at::Tensor& bias) {
  const int64_t b = x.size(0), l = x.size(1), n = num_heads, d = q->weight.size(0) / num_heads;
  const auto qh = at::linear(x, q->weight).view({b, l, n, d}).transpose(1, 2);  // [B, H, L, D]
  const auto kh = at::linear(x, k->weight).view({b, l, n, d}).transpose(1, 2);
  const auto vh = at::linear(x, v->weight).view({b, l, n, d}).transpose(1, 2);
  auto scores = at::matmul(qh, kh.transpose(-2, -1)) + bias;                  // [B, H, L, L], unscaled
  const auto probs = at::softmax(scores.to(at::kFloat), -1).to(scores.scalar_type());
  const auto out = at::matmul(probs, vh).transpose(1, 2).reshape({b, l, n * d});  // [B, L, dim_attn]
  return at::linear(out, o->weight);
}

FeedForwardImpl::FeedForwardImpl(const T5Config& c, c10::ScalarType dtype) {
  gate = register_module("gate", torch::nn::ModuleList());
  gate->push_back(Weight(std::vector<int64_t>{c.dim_ffn, c.dim}, dtype));
  fc1 = register_module("fc1", Weight(std::vector<int64_t>{c.dim_ffn, c.dim}, dtype));
  fc2 = register_module("fc2", Weight(std::vector<int64_t>{c.dim, c.dim_ffn}, dtype));
}

at::Tensor FeedForwardImpl::forward(const at::Tensor& x) {
  const auto& g = gate->ptr<WeightImpl>(0)->weight;
  const auto h = at::linear(x, fc1->weight) * at::gelu(at::linear(x, g), "tanh");
  return at::linear(h, fc2->weight);
}

RelativeEmbeddingImpl::RelativeEmbeddingImpl(const T5Config& c, c10::ScalarType dtype) {
  embedding = register_module("embedding", Weight(std::vector<int64_t>{c.num_buckets, c.num_heads}, dtype));
}

at::Tensor RelativeEmbeddingImpl::forward(const at::Tensor& buckets) {
  return at::embedding(embedding->weight, buckets).permute({2, 0, 1}).unsqueeze(0).contiguous();  // [1, H, L, L]
}

at::Tensor relative_position_buckets(int64_t length, int64_t num_buckets, int64_t max_dist) {
  const auto pos = at::arange(length, at::kLong);
  auto rel = pos.unsqueeze(0) - pos.unsqueeze(1);  // [Lq, Lk]: key - query
  const int64_t half = num_buckets / 2;            // bidirectional: one half per direction
  auto buckets = rel.gt(0).to(at::kLong) * half;
  rel = rel.abs();
  const int64_t max_exact = half / 2;
  // Same fp32 arithmetic as upstream (log of rel / max_exact, scaled into the remaining buckets, truncated).
  auto large = at::log(rel.to(at::kFloat) / static_cast<double>(max_exact)) /
               std::log(static_cast<double>(max_dist) / static_cast<double>(max_exact)) *
               static_cast<double>(half - max_exact);
  // rel = 0 gives -inf: never selected (rel < max_exact), but keep the cast defined.
  large = at::nan_to_num(large, 0.0, 0.0, 0.0).to(at::kLong) + max_exact;
  large = at::clamp_max(large, half - 1);
  return buckets + at::where(rel.lt(max_exact), rel, large);
}

BlockImpl::BlockImpl(const T5Config& c, c10::ScalarType dtype) {
  norm1 = register_module("norm1", RMSNorm(c.dim, c.eps, dtype));
  attn = register_module("attn", Attention(c, dtype));
  norm2 = register_module("norm2", RMSNorm(c.dim, c.eps, dtype));
  ffn = register_module("ffn", FeedForward(c, dtype));
  pos_embedding = register_module("pos_embedding", RelativeEmbedding(c, dtype));
}

at::Tensor BlockImpl::forward(const at::Tensor& x, const at::Tensor& buckets, const at::Tensor& key_mask) {
  auto bias = pos_embedding(buckets).to(x.scalar_type());  // [1, H, L, L]
  if (key_mask.defined()) {
    // Masked keys get finfo(dtype).min of the activation dtype (upstream masked_fill on the bias).
    const auto masked = key_mask.eq(0).view({key_mask.size(0), 1, 1, key_mask.size(1)});
    const double lowest = x.scalar_type() == at::kHalf       ? -65504.0
                          : x.scalar_type() == at::kBFloat16 ? -3.3895313892515355e38
                                                             : static_cast<double>(std::numeric_limits<float>::lowest());
    bias = bias.expand({key_mask.size(0), -1, -1, -1}).masked_fill(masked, lowest);
  }
  auto h = fp16_clamp(x + attn(norm1(x), bias));
  return fp16_clamp(h + ffn(norm2(h)));
}

T5EncoderImpl::T5EncoderImpl(const T5Config& c, c10::ScalarType dtype) : config(c) {
  c.validate();
  token_embedding = register_module("token_embedding", Weight(std::vector<int64_t>{c.vocab_size, c.dim}, dtype));
  blocks = register_module("blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < c.num_layers; ++i) blocks->push_back(Block(c, dtype));
  norm = register_module("norm", RMSNorm(c.dim, c.eps, dtype));
}

at::Tensor T5EncoderImpl::forward(const at::Tensor& ids, const at::Tensor& mask,
                                  const std::function<void()>& between_layers) {
  auto x = at::embedding(token_embedding->weight, ids);  // [B, L, dim]
  const auto buckets = relative_position_buckets(ids.size(1), config.num_buckets, config.max_dist).to(x.device());
  for (const auto& block : *blocks) {
    if (between_layers) between_layers();
    x = block->as<BlockImpl>()->forward(x, buckets, mask);
  }
  return norm(x);
}

void randomize_parameters(T5EncoderImpl& module, uint64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  at::NoGradGuard no_grad;
  const auto& c = module.config;
  for (auto& item : module.named_parameters(/*recurse=*/true)) {
    const auto& name = item.key();
    auto& p = item.value();
    auto values = at::empty(p.sizes(), at::kFloat);
    auto has = [&](const char* s) { return name.find(s) != std::string::npos; };
    if (p.dim() == 1) {
      values.normal_(1.0, 0.1, gen);  // norm scales
    } else if (has("token_embedding")) {
      values.normal_(0.0, 1.0, gen);
    } else if (has("pos_embedding")) {
      values.normal_(0.0, std::pow(2.0 * c.num_buckets * c.num_heads, -0.5), gen);
    } else if (has(".fc2.")) {
      values.normal_(0.0, std::pow(static_cast<double>(c.dim_ffn), -0.5), gen);
    } else if (has(".attn.q.")) {
      values.normal_(0.0, std::pow(static_cast<double>(c.dim * c.dim_attn), -0.5), gen);
    } else if (has(".attn.o.")) {
      values.normal_(0.0, std::pow(static_cast<double>(c.dim_attn), -0.5), gen);
    } else {
      values.normal_(0.0, std::pow(static_cast<double>(c.dim), -0.5), gen);
    }
    p.copy_(values);
  }
}

}  // namespace liveavatar::text
