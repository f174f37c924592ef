// DiT building blocks. Submodule / parameter names are the upstream state_dict names, so loading is a name match.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/modules/conv.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/modules/normalization.h>
#include <torch/nn/pimpl.h>

#include <array>
#include <functional>
#include <tuple>
#include <vector>

#include "liveavatar/dit.h"

namespace liveavatar::dit {

/// Layer norm without affine parameters (WanLayerNorm / nn.LayerNorm(elementwise_affine=False)).
inline at::Tensor plain_layer_norm(const at::Tensor& x, double eps) {
  return at::layer_norm(x, {x.size(-1)}, {}, {}, eps);
}

/// Linear in fp32 whatever the weight dtype (upstream runs these under autocast(float32)).
at::Tensor linear_f32(const at::Tensor& x, const torch::nn::LinearImpl& linear);

// --- RMSNorm (WanRMSNorm): x * rsqrt(mean(x^2) + eps) in fp32, back to x's dtype, times weight -------------------
struct RMSNormOptions {
  int64_t dim;
  double eps = 1e-6;
};
class RMSNormImpl : public torch::nn::Module {
 public:
  explicit RMSNormImpl(const RMSNormOptions& options);
  at::Tensor forward(const at::Tensor& x);  // [..., dim]
  RMSNormOptions options;
  at::Tensor weight;  // [dim]
};
TORCH_MODULE(RMSNorm);

// --- Attention projections (WanSelfAttention / WanCrossAttention / AudioCrossAttention) ---------------------------
struct AttentionOptions {
  int64_t dim;
  int64_t num_heads;
  double eps = 1e-6;
};
class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const AttentionOptions& options);
  /// Self-attention projections: q, k with QK RMSNorm, v; each [B, L, H, D].
  std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv(const at::Tensor& x);
  /// Cross-attention (no RoPE, no mask): x [B, L1, dim] attends to context [B, L2, dim] -> [B, L1, dim].
  at::Tensor cross(const at::Tensor& x, const at::Tensor& context);
  /// Attention over prepared heads q [B, Lq, H, D], k/v [B, Lk, H, D], then the output projection -> [B, Lq, dim].
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

  AttentionOptions options;
  torch::nn::Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
  RMSNorm norm_q{nullptr}, norm_k{nullptr};
};
TORCH_MODULE(Attention);

/// Scaled dot-product attention on [B, L, H, D] tensors (default scale, no mask) -> [B, Lq, H, D].
at::Tensor sdpa_blhd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

// --- Transformer block (CausalWanS2VAttentionBlock) -------------------------------------------------------------
struct BlockOptions {
  int64_t dim;
  int64_t ffn_dim;
  int64_t num_heads;
  double eps = 1e-6;
};

/// Per-token adaLN vectors for one block call: six [B, G, 1, dim] fp32 tensors (shift/scale/gate for attention,
/// shift/scale/gate for the FFN); the hidden states [B, L, dim] are viewed as [B, G, L / G, dim]. Noisy tokens:
/// G = frames (one vector per latent frame); conditioning tokens: G = 1 (the t = 0 vector).
struct Modulation {
  std::array<at::Tensor, 6> e;
  int64_t groups = 1;
};

/// Self-attention of one block call: given the roped / raw q, k, v of the block's tokens, returns attention output
/// [B, L, H, D]. The caller (the model) implements the KV ring cache and the conditioning sink.
using SelfAttentionFn =
    std::function<at::Tensor(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v)>;

class BlockImpl : public torch::nn::Module {
 public:
  explicit BlockImpl(const BlockOptions& options);
  /// modulation = self.modulation [1, 6, dim] + e0 ([B, F, 6, 2, dim] fp32); slot 0 = noisy, 1 = conditioning.
  Modulation modulation_for(const at::Tensor& e0, bool conditioning) const;
  /// x [B, L, dim] in the model dtype -> same. `attention` gets q, k, v [B, L, H, D] after QK norm.
  at::Tensor forward(const at::Tensor& x, const Modulation& mod, const at::Tensor& context,
                     const SelfAttentionFn& attention);

  BlockOptions options;
  Attention self_attn{nullptr};
  torch::nn::LayerNorm norm3{nullptr};  // affine (cross_attn_norm=True)
  Attention cross_attn{nullptr};
  torch::nn::Sequential ffn{nullptr};    // ffn.0 Linear, ffn.1 GELU(tanh), ffn.2 Linear
  at::Tensor modulation;                 // [1, 6, dim]
};
TORCH_MODULE(Block);

// --- Output head (CausalHead_S2V) -------------------------------------------------------------------------------
struct HeadOptions {
  int64_t dim;
  int64_t out_dim;
  std::array<int64_t, 3> patch_size;
  double eps = 1e-6;
};
class HeadImpl : public torch::nn::Module {
 public:
  explicit HeadImpl(const HeadOptions& options);
  /// x [B, F * S, dim], e [B * F, dim] fp32 (time embedding per frame) -> [B, F * S, out_dim * prod(patch)] in x's dtype.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& e);
  HeadOptions options;
  torch::nn::Linear head{nullptr};
  at::Tensor modulation;  // [1, 2, dim]
};
TORCH_MODULE(Head);

// --- Audio: CausalConv1d, MotionEncoder_tc, CausalAudioEncoder ----------------------------------------------------
struct CausalConv1dOptions {
  int64_t in;
  int64_t out;
  int64_t kernel = 3;
  int64_t stride = 1;
};
class CausalConv1dImpl : public torch::nn::Module {
 public:
  explicit CausalConv1dImpl(const CausalConv1dOptions& options);
  at::Tensor forward(const at::Tensor& x);  // [B, C, T] -> replicate-pad (kernel - 1) on the left -> conv
  CausalConv1dOptions options;
  torch::nn::Conv1d conv{nullptr};
};
TORCH_MODULE(CausalConv1d);

struct MotionEncoderOptions {
  int64_t in_dim;
  int64_t hidden_dim;
  int64_t num_heads;  // audio tokens per frame
  bool need_global = true;
};
class MotionEncoderImpl : public torch::nn::Module {
 public:
  explicit MotionEncoderImpl(const MotionEncoderOptions& options);
  /// x [B, T, C] -> {global [B, T', 1, hidden] (undefined without need_global), local [B, T', heads + 1, hidden]}.
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& x);
  MotionEncoderOptions options;
  CausalConv1d conv1_local{nullptr}, conv1_global{nullptr}, conv2{nullptr}, conv3{nullptr};
  torch::nn::Linear final_linear{nullptr};
  at::Tensor padding_tokens;  // [1, 1, 1, hidden]
};
TORCH_MODULE(MotionEncoder);

struct AudioEncoderOptions {
  int64_t audio_dim;
  int64_t num_layers;
  int64_t out_dim;
  int64_t num_token;
  bool need_global;
};
class AudioEncoderImpl : public torch::nn::Module {
 public:
  explicit AudioEncoderImpl(const AudioEncoderOptions& options);
  /// features [B, layers, audio_dim, T] -> {global [B, T', 1, dim], local [B, T', tokens + 1, dim]} in fp32.
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& features);
  AudioEncoderOptions options;
  MotionEncoder encoder{nullptr};
  at::Tensor weights;  // [1, layers, 1, 1]
};
TORCH_MODULE(AudioEncoder);

// --- Audio injector (AudioInjector_WAN) with diffusers AdaLayerNorm -----------------------------------------------
class AdaLayerNormImpl : public torch::nn::Module {
 public:
  AdaLayerNormImpl(int64_t embedding_dim, int64_t output_dim, double eps);
  /// x [N, L, output_dim / 2], temb [N, embedding_dim]: LN(x) * (1 + scale) + shift, (shift, scale) = linear(silu(temb)).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb);
  double eps;
  torch::nn::Linear linear{nullptr};
};
TORCH_MODULE(AdaLayerNorm);

struct AudioInjectorOptions {
  int64_t dim;
  int64_t num_heads;
  int64_t num_injectors;
  bool enable_adain;
  bool need_adain_out;
  double eps = 1e-6;
  double adain_eps = 1e-5;
};
class AudioInjectorImpl : public torch::nn::Module {
 public:
  explicit AudioInjectorImpl(const AudioInjectorOptions& options);
  /// hidden [B, F * S, dim] (noisy tokens), audio [B, F, tokens, dim], audio_global [B, F, 1, dim] -> residual to add.
  at::Tensor forward(int64_t index, const at::Tensor& hidden, const at::Tensor& audio, const at::Tensor& audio_global);
  AudioInjectorOptions options;
  torch::nn::ModuleList injector{nullptr};
  torch::nn::ModuleList injector_adain_layers{nullptr};
  torch::nn::ModuleList injector_adain_output_layers{nullptr};  // registered only when upstream has them (unused)
};
TORCH_MODULE(AudioInjector);

// --- FramePack motion packer (FramePackMotioner) ------------------------------------------------------------------
struct FramePackOptions {
  int64_t dim;
  int64_t in_channels = 16;
  std::array<int64_t, 3> buckets{1, 2, 16};
};
class FramePackImpl : public torch::nn::Module {
 public:
  explicit FramePackImpl(const FramePackOptions& options);
  /// motion [C, T, H, W] (T <= sum(buckets); zero-padded in front) -> tokens [1, N, dim]: 1x, 2x, 4x buckets.
  at::Tensor forward(const at::Tensor& motion);
  FramePackOptions options;
  torch::nn::Conv3d proj{nullptr}, proj_2x{nullptr}, proj_4x{nullptr};
};
TORCH_MODULE(FramePack);

}  // namespace liveavatar::dit
