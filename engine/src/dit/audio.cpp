// Audio path: layer-weighted wav2vec2 states -> causal conv encoder (local + global tokens) -> per-layer injection.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "modules.h"

namespace liveavatar::dit {

CausalConv1dImpl::CausalConv1dImpl(const CausalConv1dOptions& opts) : options(opts) {
  conv = register_module("conv", Conv1d(opts.in, opts.out, opts.kernel, opts.stride, opts.params));
}

at::Tensor CausalConv1dImpl::forward(const at::Tensor& x) {
  // Replicate-pad kernel - 1 frames on the left so frame t sees only frames <= t.
  const auto padded = at::pad(x, {options.kernel - 1, 0}, "replicate");
  return conv(padded);
}

MotionEncoderImpl::MotionEncoderImpl(const MotionEncoderOptions& opts) : options(opts) {
  const int64_t h = opts.hidden_dim;
  const auto& p = opts.params;
  conv1_local = register_module("conv1_local",
                                CausalConv1d(CausalConv1dOptions{opts.in_dim, h / 4 * opts.num_heads, 3, 1, p}));
  if (opts.need_global)
    conv1_global = register_module("conv1_global", CausalConv1d(CausalConv1dOptions{opts.in_dim, h / 4, 3, 1, p}));
  conv2 = register_module("conv2", CausalConv1d(CausalConv1dOptions{h / 4, h / 2, 3, 2, p}));
  conv3 = register_module("conv3", CausalConv1d(CausalConv1dOptions{h / 2, h, 3, 2, p}));
  if (opts.need_global) final_linear = register_module("final_linear", Linear(h, h, p));
  padding_tokens = register_parameter("padding_tokens", at::empty({1, 1, 1, h}, p.tensor), false);
}

std::pair<at::Tensor, at::Tensor> MotionEncoderImpl::forward(const at::Tensor& x_btc) {
  constexpr double kEps = 1e-6;
  const auto x_bct = x_btc.permute({0, 2, 1});  // [B, C, T]
  const int64_t b = x_bct.size(0), n = options.num_heads;
  // conv -> LN -> SiLU twice more with stride 2: [.., T] -> [.., ceil(ceil(T / 2) / 2)].
  auto tail = [&](at::Tensor x_btc2) {  // x [N, T, C/4]
    auto x = at::silu(plain_layer_norm(x_btc2, kEps));
    x = conv2(x.permute({0, 2, 1})).permute({0, 2, 1});  // [N, T2, C/2]
    x = at::silu(plain_layer_norm(x, kEps));
    x = conv3(x.permute({0, 2, 1})).permute({0, 2, 1});  // [N, T3, C]
    return at::silu(plain_layer_norm(x, kEps));
  };
  // Local: heads split from channels, 'b (n c) t -> (b n) t c'.
  auto local = conv1_local(x_bct);  // [B, n*C/4, T]
  const int64_t t = local.size(2);
  local = local.view({b, n, -1, t}).permute({0, 1, 3, 2}).reshape({b * n, t, -1});  // [B*n, T, C/4]
  local = tail(local);                                                              // [B*n, T', C]
  local = local.view({b, n, local.size(1), local.size(2)}).permute({0, 2, 1, 3});   // [B, T', n, C]
  const auto pad = padding_tokens.expand({b, local.size(1), 1, local.size(3)}).to(local.scalar_type());
  local = at::cat({local, pad}, 2);  // [B, T', n + 1, C]
  if (!options.need_global) return {at::Tensor(), local};
  auto global = conv1_global(x_bct).permute({0, 2, 1});  // [B, T, C/4]
  global = tail(global);
  global = final_linear(global).unsqueeze(2);  // [B, T', 1, C]
  return {global, local};
}

AudioEncoderImpl::AudioEncoderImpl(const AudioEncoderOptions& opts) : options(opts) {
  encoder = register_module("encoder", MotionEncoder(MotionEncoderOptions{opts.audio_dim, opts.out_dim,
                                                                          opts.num_token, opts.need_global,
                                                                          opts.params}));
  weights = register_parameter("weights", at::empty({1, opts.num_layers, 1, 1}, opts.params.tensor), false);
}

std::pair<at::Tensor, at::Tensor> AudioEncoderImpl::forward(const at::Tensor& features) {
  // Softly weighted sum over the wav2vec2 layers, in fp32 (upstream runs it under autocast(float32)).
  const auto f = features.to(at::kFloat);            // [B, layers, C, T]
  const auto w = at::silu(weights.to(at::kFloat));   // [1, layers, 1, 1]
  const auto w_sum = w.sum(1, /*keepdim=*/true);
  const auto weighted = ((f * w) / w_sum).sum(1);    // [B, C, T]
  return encoder->forward(weighted.permute({0, 2, 1}));  // input [B, T, C]
}

AdaLayerNormImpl::AdaLayerNormImpl(int64_t embedding_dim, int64_t output_dim, double eps_, const ParamOptions& params)
    : eps(eps_) {
  linear = register_module("linear", Linear(embedding_dim, output_dim, params));
}

at::Tensor AdaLayerNormImpl::forward(const at::Tensor& x, const at::Tensor& temb) {
  const auto m = linear(at::silu(temb));  // [N, 2 * C]; chunk_dim=1: shift first, then scale
  const auto parts = m.chunk(2, 1);
  const auto shift = parts[0].unsqueeze(1), scale = parts[1].unsqueeze(1);  // [N, 1, C]
  return plain_layer_norm(x, eps) * (1 + scale) + shift;
}

AudioInjectorImpl::AudioInjectorImpl(const AudioInjectorOptions& opts) : options(opts) {
  const auto& p = opts.params;
  injector = register_module("injector", IndexedList());
  for (int64_t i : opts.indices)
    injector->insert(i, Attention(AttentionOptions{opts.dim, opts.num_heads, opts.eps, p}).ptr());
  if (opts.enable_adain) {
    injector_adain_layers = register_module("injector_adain_layers", IndexedList());
    for (int64_t i : opts.indices)
      injector_adain_layers->insert(i, AdaLayerNorm(opts.dim, 2 * opts.dim, opts.adain_eps, p).ptr());
    if (opts.need_adain_out) {
      injector_adain_output_layers = register_module("injector_adain_output_layers", IndexedList());
      for (int64_t i : opts.indices) injector_adain_output_layers->insert(i, Linear(opts.dim, opts.dim, p).ptr());
    }
  }
}

at::Tensor AudioInjectorImpl::forward(int64_t index, const at::Tensor& hidden, const at::Tensor& audio,
                                      const at::Tensor& audio_global) {
  const int64_t b = hidden.size(0), frames = audio.size(1), c = hidden.size(2);
  const auto per_frame = hidden.reshape({b * frames, -1, c});  // 'b (t n) c -> (b t) n c'
  at::Tensor attn_in;
  if (options.enable_adain) {
    const auto temb = audio_global.reshape({b * frames, -1, c}).select(1, 0).to(hidden.scalar_type());  // [B*F, C]
    attn_in = injector_adain_layers[index]->as<AdaLayerNormImpl>()->forward(per_frame, temb);
  } else {
    attn_in = plain_layer_norm(per_frame, 1e-6);  // injector_pre_norm_feat
  }
  const auto context = audio.reshape({b * frames, -1, c}).to(hidden.scalar_type());  // [B*F, tokens, C]
  const auto out = injector[index]->as<AttentionImpl>()->cross(attn_in, context);   // [B*F, S, C]
  return out.reshape({b, -1, c});
}

FramePackImpl::FramePackImpl(const FramePackOptions& opts) : options(opts) {
  proj = register_module("proj", PatchConv3d(opts.in_channels, opts.dim, std::array<int64_t, 3>{1, 2, 2}, opts.params));
  proj_2x = register_module("proj_2x", PatchConv3d(opts.in_channels, opts.dim, std::array<int64_t, 3>{2, 4, 4}, opts.params));
  proj_4x = register_module("proj_4x", PatchConv3d(opts.in_channels, opts.dim, std::array<int64_t, 3>{4, 8, 8}, opts.params));
}

at::Tensor FramePackImpl::forward(const at::Tensor& motion) {
  const auto& bk = options.buckets;
  const int64_t total = bk[0] + bk[1] + bk[2];
  const int64_t c = motion.size(0), h = motion.size(2), w = motion.size(3);
  // The most recent `total` motion latents, zero-padded in front when fewer.
  auto packed = at::zeros({c, total, h, w}, motion.options());
  const int64_t overlap = std::min(total, motion.size(1));
  if (overlap > 0) packed.slice(1, total - overlap).copy_(motion.slice(1, motion.size(1) - overlap));
  packed = packed.unsqueeze(0);                          // [1, C, total, H, W]
  const auto far = packed.slice(2, 0, bk[2]);            // oldest 16 -> 4x
  const auto mid = packed.slice(2, bk[2], bk[2] + bk[1]);  // next 2 -> 2x
  const auto near = packed.slice(2, bk[2] + bk[1]);      // newest 1 -> 1x
  auto tokens = [](const at::Tensor& y) { return y.flatten(2).transpose(1, 2); };  // [1, N, dim]
  return at::cat({tokens(proj(near)), tokens(proj_2x(mid)), tokens(proj_4x(far))}, 1);
}

}  // namespace liveavatar::dit
