// DiT building blocks. Submodule / parameter names are the upstream state_dict names, so loading is a name match.
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <ATen/ATen.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/container/sequential.h>
#include <torch/nn/pimpl.h>

#include <array>
#include <functional>
#include <map>
#include <memory>
#include <tuple>
#include <vector>

#include "dit/dit.h"

namespace liveavatar::dit {

/// How a module creates its parameters: uninitialised (at::empty) on `tensor`'s device and dtype, because their
/// values come from a checkpoint (or randomize_parameters) and drawing 16 G random numbers first takes minutes.
/// `fp8`: Linear layers hold `weight_fp8` (float8_e4m3fn) + `weight_scale` (fp32, 0-dim or [out]) instead of
/// `weight`, the layout weights::convert writes. Passed explicitly (no process-global default dtype), so shards of
/// different dtypes and devices can be built concurrently.
struct ParamOptions {
  at::TensorOptions tensor = at::TensorOptions().dtype(at::kFloat);
  bool fp8 = false;
  bool fp8_per_channel = false;
  /// FP8 Linear layers run at::_scaled_mm (else dequantised weights and a bf16 matmul).
  bool fp8_scaled_mm = false;
  /// The attention kernel of every attention module built with these options.
  AttentionKernel attention = AttentionKernel::kAuto;
  /// The same device, another dtype, no FP8 (modules upstream runs in fp32 or keeps out of FP8).
  ParamOptions with_dtype(at::ScalarType dtype) const {
    ParamOptions p = *this;
    p.tensor = tensor.dtype(dtype);
    p.fp8 = false;
    return p;
  }
  ParamOptions high_precision() const { return with_dtype(c10::typeMetaToScalarType(tensor.dtype())); }
  at::ScalarType dtype() const { return c10::typeMetaToScalarType(tensor.dtype()); }
};

/// Layer norm without affine parameters (WanLayerNorm / nn.LayerNorm(elementwise_affine=False)).
inline at::Tensor plain_layer_norm(const at::Tensor& x, double eps) {
  return at::layer_norm(x, {x.size(-1)}, {}, {}, eps);
}

// --- Parameter-holding primitives: torch::nn's draw random values in their constructors; these do not ----------
/// nn.Linear, or upstream's FP8 linear (e4m3 weight + dequantisation scale; run dequantised here).
class LinearImpl : public torch::nn::Module {
 public:
  LinearImpl(int64_t in_features, int64_t out_features, const ParamOptions& params, bool bias = true);
  /// x [..., in] -> [..., out] in x's dtype (the weight is cast / dequantised to it when it differs).
  at::Tensor forward(const at::Tensor& x);
  /// The weight as a dense [out, in] tensor of `dtype` (dequantised: fp8.float() * scale, then cast).
  at::Tensor dense_weight(at::ScalarType dtype) const;
  bool is_fp8() const { return weight_fp8.defined(); }
  /// FP8 through at::_scaled_mm (ParamOptions::fp8_scaled_mm and both dimensions multiples of 16).
  bool scaled_mm = false;
  at::Tensor fp8_scaled_linear(const at::Tensor& x) const;
  int64_t in_features, out_features;
  at::Tensor weight;        // [out, in] (not FP8)
  at::Tensor weight_fp8;    // [out, in] float8_e4m3fn (FP8)
  at::Tensor weight_scale;  // [] or [out] fp32 (FP8)
  at::Tensor bias;          // [out]
};
TORCH_MODULE(Linear);

/// nn.Conv3d with stride = kernel (patchify); weight [out, in, k0, k1, k2], bias [out].
class PatchConv3dImpl : public torch::nn::Module {
 public:
  PatchConv3dImpl(int64_t in, int64_t out, std::array<int64_t, 3> kernel, const ParamOptions& params);
  at::Tensor forward(const at::Tensor& x);  // [B, in, F, H, W] -> [B, out, F / k0, H / k1, W / k2]
  std::array<int64_t, 3> kernel;
  at::Tensor weight, bias;
};
TORCH_MODULE(PatchConv3d);

/// nn.Conv1d without padding; weight [out, in, kernel], bias [out].
class Conv1dImpl : public torch::nn::Module {
 public:
  Conv1dImpl(int64_t in, int64_t out, int64_t kernel, int64_t stride, const ParamOptions& params);
  at::Tensor forward(const at::Tensor& x);  // [B, in, T] -> [B, out, T']
  int64_t stride;
  at::Tensor weight, bias;
};
TORCH_MODULE(Conv1d);

/// nn.LayerNorm(dim, elementwise_affine=True): weight, bias [dim].
class AffineLayerNormImpl : public torch::nn::Module {
 public:
  AffineLayerNormImpl(int64_t dim, double eps, const ParamOptions& params);
  double eps;
  at::Tensor weight, bias;
};
TORCH_MODULE(AffineLayerNorm);

/// nn.Embedding(rows, dim): weight [rows, dim] (read by row, never looked up by index tensors here).
class EmbeddingImpl : public torch::nn::Module {
 public:
  EmbeddingImpl(int64_t rows, int64_t dim, const ParamOptions& params);
  at::Tensor weight;
};
TORCH_MODULE(Embedding);

/// A list of modules registered under their global index ("blocks.17", "audio_injector.injector.5"), so a shard
/// that holds layers [first, last) has exactly the checkpoint names of those layers.
class IndexedListImpl : public torch::nn::Module {
 public:
  void insert(int64_t index, std::shared_ptr<torch::nn::Module> module);
  bool contains(int64_t index) const { return items_.count(index) != 0; }
  /// Throws DitError when the index is not held (another shard's layer).
  std::shared_ptr<torch::nn::Module> operator[](int64_t index) const;
  size_t size() const { return items_.size(); }

 private:
  std::map<int64_t, std::shared_ptr<torch::nn::Module>> items_;
};
TORCH_MODULE(IndexedList);

/// Linear in fp32 whatever the weight dtype (upstream runs these under autocast(float32)).
at::Tensor linear_f32(const at::Tensor& x, const LinearImpl& linear);

// --- RMSNorm (WanRMSNorm): x * rsqrt(mean(x^2) + eps) in fp32, back to x's dtype, times weight -------------------
struct RMSNormOptions {
  int64_t dim;
  double eps = 1e-6;
  ParamOptions params = {};
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
  ParamOptions params = {};
};
class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const AttentionOptions& options);
  /// Self-attention projections: q, k with QK RMSNorm, v; each [B, L, H, D].
  std::tuple<at::Tensor, at::Tensor, at::Tensor> qkv(const at::Tensor& x);
  /// Cross-attention (no RoPE, no mask): x [B, L1, dim] attends to context [B, L2, dim] -> [B, L1, dim].
  at::Tensor cross(const at::Tensor& x, const at::Tensor& context);
  /// The context's keys (QK-normed) and values [B, L2, H, D]: the text is the same for a whole stream, so a
  /// session computes them once per layer (cross_cached) instead of at every call.
  LayerKV cross_kv(const at::Tensor& context);
  /// cross() with keys / values from cross_kv(): the same arithmetic, bit for bit.
  at::Tensor cross_cached(const at::Tensor& x, const LayerKV& context_kv);
  /// Attention over prepared heads q [B, Lq, H, D], k/v [B, Lk, H, D], then the output projection -> [B, Lq, dim].
  at::Tensor attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v);

  AttentionOptions options;
  Linear q{nullptr}, k{nullptr}, v{nullptr}, o{nullptr};
  RMSNorm norm_q{nullptr}, norm_k{nullptr};
};
TORCH_MODULE(Attention);

/// Scaled dot-product attention on [B, L, H, D] tensors (default scale, no mask) -> [B, Lq, H, D].
at::Tensor sdpa_blhd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     AttentionKernel kernel = AttentionKernel::kAuto);
/// The same over the union of two key / value sets (the ring window and the sink) as one softmax, without
/// concatenating them: each set's output and log-sum-exp, merged in fp32 (CPU: the flash kernel SDPA uses; CUDA:
/// the memory-efficient kernel). Other devices concatenate. [B, L, H, D] in, [B, Lq, H, D] in q's dtype out.
at::Tensor sdpa_two_blhd(const at::Tensor& q, const at::Tensor& k1, const at::Tensor& v1, const at::Tensor& k2,
                         const at::Tensor& v2, AttentionKernel kernel = AttentionKernel::kAuto);

// --- Transformer block (CausalWanS2VAttentionBlock) -------------------------------------------------------------
struct BlockOptions {
  int64_t dim;
  int64_t ffn_dim;
  int64_t num_heads;
  double eps = 1e-6;
  ParamOptions params = {};
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
  /// The same with the text cross-attention keys / values precomputed (cross_attn->cross_kv(context)).
  at::Tensor forward(const at::Tensor& x, const Modulation& mod, const LayerKV& context_kv,
                     const SelfAttentionFn& attention);

  BlockOptions options;
  Attention self_attn{nullptr};
  AffineLayerNorm norm3{nullptr};        // affine (cross_attn_norm=True)
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
  ParamOptions params = {};
};
class HeadImpl : public torch::nn::Module {
 public:
  explicit HeadImpl(const HeadOptions& options);
  /// x [B, F * S, dim], e [B * F, dim] fp32 (time embedding per frame) -> [B, F * S, out_dim * prod(patch)] in x's dtype.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& e);
  HeadOptions options;
  Linear head{nullptr};
  at::Tensor modulation;  // [1, 2, dim]
};
TORCH_MODULE(Head);

// --- Audio: CausalConv1d, MotionEncoder_tc, CausalAudioEncoder ----------------------------------------------------
struct CausalConv1dOptions {
  int64_t in;
  int64_t out;
  int64_t kernel = 3;
  int64_t stride = 1;
  ParamOptions params = {};
};
class CausalConv1dImpl : public torch::nn::Module {
 public:
  explicit CausalConv1dImpl(const CausalConv1dOptions& options);
  at::Tensor forward(const at::Tensor& x);  // [B, C, T] -> replicate-pad (kernel - 1) on the left -> conv
  CausalConv1dOptions options;
  Conv1d conv{nullptr};
};
TORCH_MODULE(CausalConv1d);

struct MotionEncoderOptions {
  int64_t in_dim;
  int64_t hidden_dim;
  int64_t num_heads;  // audio tokens per frame
  bool need_global = true;
  ParamOptions params = {};
};
class MotionEncoderImpl : public torch::nn::Module {
 public:
  explicit MotionEncoderImpl(const MotionEncoderOptions& options);
  /// x [B, T, C] -> {global [B, T', 1, hidden] (undefined without need_global), local [B, T', heads + 1, hidden]}.
  std::pair<at::Tensor, at::Tensor> forward(const at::Tensor& x);
  MotionEncoderOptions options;
  CausalConv1d conv1_local{nullptr}, conv1_global{nullptr}, conv2{nullptr}, conv3{nullptr};
  Linear final_linear{nullptr};
  at::Tensor padding_tokens;  // [1, 1, 1, hidden]
};
TORCH_MODULE(MotionEncoder);

struct AudioEncoderOptions {
  int64_t audio_dim;
  int64_t num_layers;
  int64_t out_dim;
  int64_t num_token;
  bool need_global;
  ParamOptions params = {};
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
  AdaLayerNormImpl(int64_t embedding_dim, int64_t output_dim, double eps, const ParamOptions& params);
  /// x [N, L, output_dim / 2], temb [N, embedding_dim]: LN(x) * (1 + scale) + shift, (shift, scale) = linear(silu(temb)).
  at::Tensor forward(const at::Tensor& x, const at::Tensor& temb);
  double eps;
  Linear linear{nullptr};
};
TORCH_MODULE(AdaLayerNorm);

struct AudioInjectorOptions {
  int64_t dim;
  int64_t num_heads;
  /// The injector indices this module holds (all, or those of a shard's layers); names keep the global index.
  std::vector<int64_t> indices;
  bool enable_adain;
  bool need_adain_out;
  /// AudioInjector_WAN builds its AudioCrossAttention without passing eps: 1e-6 whatever the model's eps.
  double eps = 1e-6;
  double adain_eps = 1e-5;
  ParamOptions params = {};
};
class AudioInjectorImpl : public torch::nn::Module {
 public:
  explicit AudioInjectorImpl(const AudioInjectorOptions& options);
  /// hidden [B, F * S, dim] (noisy tokens), audio [B, F, tokens, dim], audio_global [B, F, 1, dim] -> residual to add.
  at::Tensor forward(int64_t index, const at::Tensor& hidden, const at::Tensor& audio, const at::Tensor& audio_global);
  AudioInjectorOptions options;
  IndexedList injector{nullptr};
  IndexedList injector_adain_layers{nullptr};
  IndexedList injector_adain_output_layers{nullptr};  // registered only when upstream has them (unused)
};
TORCH_MODULE(AudioInjector);

// --- FramePack motion packer (FramePackMotioner) ------------------------------------------------------------------
struct FramePackOptions {
  int64_t dim;
  int64_t in_channels = 16;
  std::array<int64_t, 3> buckets{1, 2, 16};
  ParamOptions params = {};
};
class FramePackImpl : public torch::nn::Module {
 public:
  explicit FramePackImpl(const FramePackOptions& options);
  /// motion [C, T, H, W] (T <= sum(buckets); zero-padded in front) -> tokens [1, N, dim]: 1x, 2x, 4x buckets.
  at::Tensor forward(const at::Tensor& motion);
  FramePackOptions options;
  PatchConv3d proj{nullptr}, proj_2x{nullptr}, proj_4x{nullptr};
};
TORCH_MODULE(FramePack);

}  // namespace liveavatar::dit
