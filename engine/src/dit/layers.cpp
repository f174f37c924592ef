// Transformer layers: QK-RMSNorm attention, the adaLN block with the fp32 residual, the output head.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <torch/nn/modules/activation.h>

#include "cuda/cuda.h"
#include "modules.h"

namespace liveavatar::dit {

// --- Primitives ---------------------------------------------------------------------------------------------
LinearImpl::LinearImpl(int64_t in, int64_t out, const ParamOptions& params, bool with_bias)
    : in_features(in), out_features(out) {
  // at::_scaled_mm wants both matrix dimensions in multiples of 16; other shapes (tiny test models) dequantise.
  scaled_mm = params.fp8 && params.fp8_scaled_mm && in % 16 == 0 && out % 16 == 0;
  if (params.fp8) {
    weight_fp8 = register_parameter("weight_fp8", at::empty({out, in}, params.tensor.dtype(at::kFloat8_e4m3fn)),
                                    /*requires_grad=*/false);
    const auto scale_shape = params.fp8_per_channel ? std::vector<int64_t>{out} : std::vector<int64_t>{};
    weight_scale = register_parameter("weight_scale", at::empty(scale_shape, params.tensor.dtype(at::kFloat)),
                                      /*requires_grad=*/false);
  } else {
    weight = register_parameter("weight", at::empty({out, in}, params.tensor), /*requires_grad=*/false);
  }
  if (with_bias) bias = register_parameter("bias", at::empty({out}, params.tensor), /*requires_grad=*/false);
}

at::Tensor LinearImpl::dense_weight(at::ScalarType dtype) const {
  if (!is_fp8()) return weight.scalar_type() == dtype ? weight : weight.to(dtype);
  // Dequantise as fp8.float() * scale (per tensor: 0-dim; per channel: [out, 1]), then the compute dtype.
  const auto scale = weight_scale.dim() == 0 ? weight_scale : weight_scale.unsqueeze(1);
  return (weight_fp8.to(at::kFloat) * scale).to(dtype);
}

at::Tensor LinearImpl::forward(const at::Tensor& x) {
  if (scaled_mm) return fp8_scaled_linear(x);
  const auto dtype = x.scalar_type();
  const auto b = bias.defined() && bias.scalar_type() != dtype ? bias.to(dtype) : bias;
  return at::linear(x, dense_weight(dtype), b);
}

at::Tensor LinearImpl::fp8_scaled_linear(const at::Tensor& x) const {
  // Activations quantised per call (per tensor; per row when the weight scales are per output channel, the
  // row-wise pairing _scaled_mm supports), weights static; one FP8 matmul with bf16 out. On a GPU the
  // quantisation is the project's kernel (scale stays on the device); elsewhere the same with ATen operations.
  const bool per_row = weight_scale.dim() == 1;
  const auto x2 = x.reshape({-1, in_features});
  auto [xq, xs] = x2.is_cuda() ? cuda::quantize_fp8_e4m3(x2, per_row) : cuda::quantize_fp8_reference(x2, per_row);
  const auto ws = per_row ? weight_scale.view({1, out_features}) : weight_scale;
  const std::optional<at::Tensor> b =
      bias.defined() ? std::optional<at::Tensor>(bias.to(at::kBFloat16)) : std::nullopt;
  at::Tensor y;
  if (per_row && !x2.is_cuda()) {
    // LibTorch's CPU _scaled_mm takes per-tensor scales only: the same product of the e4m3 values in fp32, scaled.
    y = at::mm(xq.to(at::kFloat), weight_fp8.to(at::kFloat).t()) * xs * ws;
    if (b) y = y + b->to(at::kFloat);
    y = y.to(at::kBFloat16);
  } else {
    y = at::_scaled_mm(xq, weight_fp8.t(), xs, ws, b, /*scale_result=*/std::nullopt, at::kBFloat16);
  }
  auto shape = x.sizes().vec();
  shape.back() = out_features;
  y = y.view(shape);
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

at::Tensor linear_f32(const at::Tensor& x, const LinearImpl& linear) {
  const auto& b = linear.bias;
  if (!linear.is_fp8() && linear.weight.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat)
    return at::linear(x, linear.weight, b);
  return at::linear(x.to(at::kFloat), linear.dense_weight(at::kFloat), b.defined() ? b.to(at::kFloat) : b);
}

PatchConv3dImpl::PatchConv3dImpl(int64_t in, int64_t out, std::array<int64_t, 3> k, const ParamOptions& params)
    : kernel(k) {
  weight = register_parameter("weight", at::empty({out, in, k[0], k[1], k[2]}, params.tensor), false);
  bias = register_parameter("bias", at::empty({out}, params.tensor), false);
}

at::Tensor PatchConv3dImpl::forward(const at::Tensor& x) {
  return at::conv3d(x, weight, bias, {kernel[0], kernel[1], kernel[2]});
}

Conv1dImpl::Conv1dImpl(int64_t in, int64_t out, int64_t kernel, int64_t stride_, const ParamOptions& params)
    : stride(stride_) {
  weight = register_parameter("weight", at::empty({out, in, kernel}, params.tensor), false);
  bias = register_parameter("bias", at::empty({out}, params.tensor), false);
}

at::Tensor Conv1dImpl::forward(const at::Tensor& x) { return at::conv1d(x, weight, bias, {stride}); }

AffineLayerNormImpl::AffineLayerNormImpl(int64_t dim, double eps_, const ParamOptions& params) : eps(eps_) {
  weight = register_parameter("weight", at::empty({dim}, params.tensor), false);
  bias = register_parameter("bias", at::empty({dim}, params.tensor), false);
}

EmbeddingImpl::EmbeddingImpl(int64_t rows, int64_t dim, const ParamOptions& params) {
  weight = register_parameter("weight", at::empty({rows, dim}, params.tensor), false);
}

void IndexedListImpl::insert(int64_t index, std::shared_ptr<torch::nn::Module> module) {
  items_[index] = register_module(std::to_string(index), std::move(module));
}

std::shared_ptr<torch::nn::Module> IndexedListImpl::operator[](int64_t index) const {
  const auto it = items_.find(index);
  if (it == items_.end())
    throw DitError("layer " + std::to_string(index) + " is not held by this model (a shard of other layers)");
  return it->second;
}

// --- Transformer layers --------------------------------------------------------------------------------------
RMSNormImpl::RMSNormImpl(const RMSNormOptions& opts) : options(opts) {
  weight = register_parameter("weight", at::empty({opts.dim}, opts.params.tensor), /*requires_grad=*/false);
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  const auto xf = x.to(at::kFloat);
  const auto normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + options.eps);
  return normed.to(x.scalar_type()) * weight;
}

AttentionImpl::AttentionImpl(const AttentionOptions& opts) : options(opts) {
  if (opts.dim % opts.num_heads != 0)
    throw DitError("attention: dim " + std::to_string(opts.dim) + " is not a multiple of num_heads " +
                   std::to_string(opts.num_heads));
  q = register_module("q", Linear(opts.dim, opts.dim, opts.params));
  k = register_module("k", Linear(opts.dim, opts.dim, opts.params));
  v = register_module("v", Linear(opts.dim, opts.dim, opts.params));
  o = register_module("o", Linear(opts.dim, opts.dim, opts.params));
  const auto hp = opts.params.high_precision();
  norm_q = register_module("norm_q", RMSNorm(RMSNormOptions{opts.dim, opts.eps, hp}));
  norm_k = register_module("norm_k", RMSNorm(RMSNormOptions{opts.dim, opts.eps, hp}));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> AttentionImpl::qkv(const at::Tensor& x) {
  const int64_t b = x.size(0), s = x.size(1), n = options.num_heads, d = options.dim / options.num_heads;
  auto qh = norm_q(q(x)).view({b, s, n, d});  // [B, L, H, D]
  auto kh = norm_k(k(x)).view({b, s, n, d});
  auto vh = v(x).view({b, s, n, d});
  return {qh, kh, vh};
}

AttentionKernel parse_attention_kernel(const std::string& name) {
  if (name == "auto") return AttentionKernel::kAuto;
  if (name == "flash") return AttentionKernel::kFlash;
  if (name == "efficient") return AttentionKernel::kEfficient;
  if (name == "cudnn") return AttentionKernel::kCudnn;
  if (name == "math") return AttentionKernel::kMath;
  throw DitError("attention kernel must be auto, flash, efficient, cudnn or math, got '" + name + "'");
}

const char* attention_kernel_name(AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::kAuto: return "auto";
    case AttentionKernel::kFlash: return "flash";
    case AttentionKernel::kEfficient: return "efficient";
    case AttentionKernel::kCudnn: return "cudnn";
    case AttentionKernel::kMath: return "math";
  }
  return "?";
}

namespace {
// q, k, v [B, H, L, D] -> [B, H, Lq, D] through the named kernel (CUDA); the CPU has the flash kernel and math.
at::Tensor sdpa_bhld(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, AttentionKernel kernel) {
  switch (kernel) {
    case AttentionKernel::kAuto:
      return at::scaled_dot_product_attention(q, k, v);
    case AttentionKernel::kMath:
      return std::get<0>(at::_scaled_dot_product_attention_math(q, k, v));
    case AttentionKernel::kFlash:
      if (q.device().is_cpu()) return std::get<0>(at::_scaled_dot_product_flash_attention_for_cpu(q, k, v));
      return std::get<0>(at::_scaled_dot_product_flash_attention(q, k, v));
    case AttentionKernel::kEfficient:
      return std::get<0>(at::_scaled_dot_product_efficient_attention(q, k, v, std::nullopt, false));
    case AttentionKernel::kCudnn:
      return std::get<0>(at::_scaled_dot_product_cudnn_attention(q, k, v, std::nullopt, false));
  }
  throw DitError("unknown attention kernel");
}
}  // namespace

at::Tensor sdpa_blhd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, AttentionKernel kernel) {
  // [B, L, H, D] -> [B, H, L, D] for SDPA and back.
  return sdpa_bhld(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), kernel).transpose(1, 2);
}

namespace {
// Attention of q [B, H, Lq, D] over k, v [B, H, Lk, D]: output [B, H, Lq, D] and log-sum-exp [B, H, Lq] fp32
// (natural log of the softmax denominator of the scaled scores). Undefined when the device has no such kernel.
std::pair<at::Tensor, at::Tensor> sdpa_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                AttentionKernel kernel) {
  if (kernel == AttentionKernel::kMath) return {};  // no log-sum-exp: the caller concatenates
  if (q.device().is_cpu()) {
    auto r = at::_scaled_dot_product_flash_attention_for_cpu(q, k, v);
    return {std::get<0>(r), std::get<1>(r)};
  }
  if (q.device().is_cuda()) {
    // The log-sum-exp comes as [B, H, Lq] (flash), [B, H, Lq padded to 32] (efficient) or [B, H, Lq, 1] (cuDNN).
    const int64_t lq = q.size(2);
    if (kernel == AttentionKernel::kFlash) {
      auto r = at::_scaled_dot_product_flash_attention(q, k, v);
      return {std::get<0>(r), std::get<1>(r).flatten(2).slice(2, 0, lq)};
    }
    if (kernel == AttentionKernel::kCudnn) {
      auto r = at::_scaled_dot_product_cudnn_attention(q, k, v, std::nullopt, /*compute_log_sumexp=*/true);
      return {std::get<0>(r), std::get<1>(r).flatten(2).slice(2, 0, lq)};
    }
    auto r = at::_scaled_dot_product_efficient_attention(q, k, v, /*attn_bias=*/std::nullopt,
                                                         /*compute_log_sumexp=*/true);
    return {std::get<0>(r), std::get<1>(r).flatten(2).slice(2, 0, lq)};
  }
  return {};
}
}  // namespace

at::Tensor sdpa_two_blhd(const at::Tensor& q, const at::Tensor& k1, const at::Tensor& v1, const at::Tensor& k2,
                         const at::Tensor& v2, AttentionKernel kernel) {
  const auto qt = q.transpose(1, 2);  // [B, H, Lq, D]
  auto [o1, l1] = sdpa_with_lse(qt, k1.transpose(1, 2), v1.transpose(1, 2), kernel);
  if (!o1.defined()) return sdpa_blhd(q, at::cat({k1, k2}, 1), at::cat({v1, v2}, 1), kernel);
  auto [o2, l2] = sdpa_with_lse(qt, k2.transpose(1, 2), v2.transpose(1, 2), kernel);
  // softmax over both sets = each set's softmax weighted by its share exp(lse_i - lse) of the total.
  const auto l = at::logaddexp(l1, l2);                     // [B, H, Lq]
  const auto w1 = at::exp(l1 - l).unsqueeze(-1), w2 = at::exp(l2 - l).unsqueeze(-1);
  const auto out = o1.to(at::kFloat) * w1 + o2.to(at::kFloat) * w2;  // [B, H, Lq, D]
  return out.to(q.scalar_type()).transpose(1, 2);
}

at::Tensor AttentionImpl::attend(const at::Tensor& qh, const at::Tensor& kh, const at::Tensor& vh) {
  const auto x = sdpa_blhd(qh, kh, vh, options.params.attention);  // [B, Lq, H, D]
  return o(x.flatten(2));                // [B, Lq, dim]
}

at::Tensor AttentionImpl::cross(const at::Tensor& x, const at::Tensor& context) {
  return cross_cached(x, cross_kv(context));
}

LayerKV AttentionImpl::cross_kv(const at::Tensor& context) {
  const int64_t b = context.size(0), n = options.num_heads, d = options.dim / options.num_heads;
  return {norm_k(k(context)).view({b, -1, n, d}), v(context).view({b, -1, n, d})};  // [B, L2, H, D]
}

at::Tensor AttentionImpl::cross_cached(const at::Tensor& x, const LayerKV& kv) {
  const int64_t b = x.size(0), n = options.num_heads, d = options.dim / options.num_heads;
  const auto qh = norm_q(q(x)).view({b, -1, n, d});  // [B, L1, H, D]
  return attend(qh, kv.k, kv.v);
}

BlockImpl::BlockImpl(const BlockOptions& opts) : options(opts) {
  // Registration order follows the upstream module (norm1 and norm2 have no parameters).
  const auto& p = opts.params;
  self_attn = register_module("self_attn", Attention(AttentionOptions{opts.dim, opts.num_heads, opts.eps, p}));
  norm3 = register_module("norm3", AffineLayerNorm(opts.dim, opts.eps, p.high_precision()));
  cross_attn = register_module("cross_attn", Attention(AttentionOptions{opts.dim, opts.num_heads, opts.eps, p}));
  ffn = register_module("ffn", torch::nn::Sequential(Linear(opts.dim, opts.ffn_dim, p),
                                                     torch::nn::GELU(torch::nn::GELUOptions().approximate("tanh")),
                                                     Linear(opts.ffn_dim, opts.dim, p)));
  modulation = register_parameter("modulation", at::empty({1, 6, opts.dim}, p.tensor), /*requires_grad=*/false);
}

Modulation BlockImpl::modulation_for(const at::Tensor& e0, bool conditioning) const {
  // [1, 6, dim] -> [1, 1, 6, 1, dim] + [B, F, 6, 2, dim] in fp32, then one [B, F, 2, dim] per vector.
  const auto all = modulation.to(at::kFloat).unsqueeze(1).unsqueeze(3) + e0;
  Modulation m;
  for (int64_t i = 0; i < 6; ++i) {
    const auto e = all.select(2, i);  // [B, F, 2, dim]
    if (conditioning)
      m.e[i] = e.slice(1, 0, 1).select(2, 1).unsqueeze(2);  // t = 0 vector of frame 0: [B, 1, 1, dim]
    else
      m.e[i] = e.select(2, 0).unsqueeze(2);                 // per frame: [B, F, 1, dim]
  }
  m.groups = conditioning ? 1 : e0.size(1);
  return m;
}

namespace {
// x [B, L, dim] * (1 + scale) + shift with the vectors broadcast per group of tokens.
at::Tensor modulate(const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale, int64_t groups) {
  const auto b = x.size(0), l = x.size(1), c = x.size(2);
  const auto xv = x.view({b, groups, l / groups, c});  // [B, G, L/G, dim]
  return (xv * (1 + scale) + shift).view({b, l, c});
}
at::Tensor gate(const at::Tensor& y, const at::Tensor& g, int64_t groups) {
  const auto b = y.size(0), l = y.size(1), c = y.size(2);
  return (y.view({b, groups, l / groups, c}) * g).view({b, l, c});
}
}  // namespace

at::Tensor BlockImpl::forward(const at::Tensor& x, const Modulation& mod, const at::Tensor& context,
                              const SelfAttentionFn& attention) {
  return forward(x, mod, cross_attn->cross_kv(context), attention);
}

at::Tensor BlockImpl::forward(const at::Tensor& x, const Modulation& mod, const LayerKV& context_kv,
                              const SelfAttentionFn& attention) {
  const auto dtype = x.scalar_type();
  const int64_t groups = mod.groups;
  if (x.size(1) % groups != 0)
    throw DitError("block: " + std::to_string(x.size(1)) + " tokens do not split into " + std::to_string(groups) +
                   " frames");
  // Self-attention on adaLN-modulated tokens (modulation in fp32, the projections in the model dtype).
  const auto norm_x = modulate(plain_layer_norm(x, options.eps).to(at::kFloat), mod.e[0], mod.e[1], groups);
  auto [qh, kh, vh] = self_attn->qkv(norm_x.to(dtype));
  const auto attn = attention(qh, kh, vh);             // [B, L, H, D]
  const auto y = self_attn->o(attn.flatten(2));        // [B, L, dim]
  auto h = x + gate(y, mod.e[2], groups);              // fp32 residual from here on

  // Cross-attention to the text; upstream rounds the residual to bf16 before norm3 even in fp32 runs.
  const auto n3 = at::layer_norm(h.to(at::kBFloat16), {options.dim}, norm3->weight, norm3->bias, options.eps);
  h = h + cross_attn->cross_cached(n3.to(dtype), context_kv);

  // FFN with GELU(tanh).
  const auto norm2_x = modulate(plain_layer_norm(h, options.eps).to(at::kFloat), mod.e[3], mod.e[4], groups);
  const auto f = ffn->forward(norm2_x.to(dtype));
  h = h + gate(f, mod.e[5], groups);
  return h.to(dtype);
}

HeadImpl::HeadImpl(const HeadOptions& opts) : options(opts) {
  const int64_t out = opts.out_dim * opts.patch_size[0] * opts.patch_size[1] * opts.patch_size[2];
  head = register_module("head", Linear(opts.dim, out, opts.params));
  modulation = register_parameter("modulation", at::empty({1, 2, opts.dim}, opts.params.tensor), false);
}

at::Tensor HeadImpl::forward(const at::Tensor& x, const at::Tensor& e) {
  const auto dtype = x.scalar_type();
  const int64_t b = x.size(0), frames = e.size(0) / b, s = x.size(1) / frames;
  const auto m = modulation.to(at::kFloat) + e.unsqueeze(1);  // [B*F, 2, dim]
  const auto shift = m.select(1, 0).unsqueeze(1).unflatten(0, {b, frames});  // [B, F, 1, dim]
  const auto scale = m.select(1, 1).unsqueeze(1).unflatten(0, {b, frames});
  const auto normed = plain_layer_norm(x, options.eps).unflatten(1, {frames, s});  // [B, F, S, dim]
  const auto y = (normed * (1 + scale) + shift).flatten(1, 2);                    // [B, F*S, dim] fp32
  return linear_f32(y, *head).to(dtype);
}

}  // namespace liveavatar::dit
