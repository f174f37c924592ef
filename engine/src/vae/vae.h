// gst-liveavatar VAE: the Wan2.1 causal video VAE (Wan2_1_VAE / WanVAE_ of LiveAvatar), ported to LibTorch.
// SPDX-License-Identifier: LGPL-2.1-or-later
//
//   vae::WanVae vae({}, torch::kCUDA, torch::kBFloat16);
//   vae.load_file(dir + "/Wan2.1_VAE.pth");                     // strict: every key by its checkpoint name
//   auto ref    = vae.encode(portrait);                         // [1, 3, 1, H, W] in [-1, 1] -> [1, 16, 1, H/8, W/8]
//   auto motion = vae.encode(portrait.repeat({1, 1, 73, 1, 1}));   // -> [1, 16, 19, H/8, W/8]
//   vae::StreamingDecoder decoder(vae);                         // one per stream: holds the causal caches
//   decoder.prime(motion.slice(2, 0, 7));                       // as upstream's TPP pipeline primes it
//   for (;;) rgb = decoder.decode_block(block_latents);         // [1, 16, 3, h, w] -> [1, 3, 12, 8h, 8w] in [-1, 1]
//
// Shapes: video [B, 3, T, H, W] with T = 1 + 4k frames, H and W multiples of 8 (the spatial stride), values in
// [-1, 1]; latents [B, z_dim, 1 + k, H/8, W/8], normalised with the 16 fixed per-channel mean / std numbers of
// upstream ((mu - mean) / std). decode() maps latents back to [B, 3, 1 + 4(T_lat - 1), H, W] clamped to [-1, 1].
//
// Thread-safety: a WanVae is immutable after load and may be shared by several threads and StreamingDecoders:
// encode() and decode() keep their causal caches on the stack. A StreamingDecoder holds one stream's caches and is
// used from one thread at a time.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "liveavatar/engine.h"  // liveavatar::Error

namespace liveavatar::weights {
struct Checkpoint;
}

namespace liveavatar::vae {

/// A VAE configuration or input that cannot work. what() says which value and what would.
class VaeError : public Error {
 public:
  using Error::Error;
};

/// The VAE shape. Defaults are the real Wan2.1 VAE as `_video_vae` builds it (vae2_1.py); each field names the
/// WanVAE_ argument it mirrors.
struct VaeConfig {
  int64_t dim = 96;                                  // dim (base channel count)
  int64_t z_dim = 16;                                // z_dim (latent channels; the encoder emits 2 z_dim)
  std::vector<int64_t> dim_mult{1, 2, 4, 4};         // dim_mult (4 levels: the decoder layout assumes it)
  int64_t num_res_blocks = 2;                        // num_res_blocks (decoder levels have one more)
  std::vector<double> attn_scales{};                 // attn_scales (extra attention at these scales; none)
  std::vector<bool> temperal_downsample{false, true, true};  // temperal_downsample (sic); decoder uses it reversed
  /// Wan2_1_VAE's fixed latent statistics (one per latent channel).
  std::vector<double> latent_mean{-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                                  0.4134,  -0.0715, 0.5517,  -0.3632, -0.1922, -0.9497, 0.2503, -0.2921};
  std::vector<double> latent_std{2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                                 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160};

  /// A small configuration for tests (dim 16, everything else as the real VAE).
  static VaeConfig tiny();
  /// The defaults with dim and z_dim read from a checkpoint's shapes (encoder.conv1.weight, conv2.weight), so a
  /// narrow test checkpoint loads without a config file. Throws VaeError if those keys are missing.
  static VaeConfig from_checkpoint(const weights::Checkpoint& checkpoint);
  /// Throws VaeError naming the first inconsistent field and the constraint.
  void validate() const;
  /// Pixels per latent pixel (2^(levels - 1) = 8).
  int64_t spatial_stride() const;
  /// Video frames per latent frame after the first (2^(temporal downsamples) = 4).
  int64_t temporal_stride() const;
  /// Parameters of the model this config builds (exact, without building it).
  uint64_t parameter_count() const;
};

class WanVaeModel;   // the module tree (engine/src/vae/modules.h)
class FeatureCache;  // the causal caches of one stream (engine/src/vae/modules.h)

/// Immutable VAE weights on one device.
class WanVae {
 public:
  /// Builds the module tree with seeded random weights (load() / load_file() replace them).
  explicit WanVae(const VaeConfig& config = {}, c10::Device device = c10::kCPU, c10::ScalarType dtype = c10::kFloat,
                  uint64_t seed = 0);
  ~WanVae();
  WanVae(const WanVae&) = delete;
  WanVae& operator=(const WanVae&) = delete;

  /// Strict load by checkpoint key (missing / unexpected / wrong shape -> weights::WeightsError); casts the dtype.
  void load(const weights::Checkpoint& checkpoint);
  /// load() from a torch.save'd state dict (Wan2.1_VAE.pth) or a .safetensors file (by extension).
  void load_file(const std::string& path);

  /// video [B, 3, 1 + 4k, H, W] in [-1, 1] -> normalised latent mean [B, z_dim, 1 + k, H/8, W/8] (upstream
  /// WanVAE_.encode: the first frame alone, then chunks of 4 through the causal cache).
  at::Tensor encode(const at::Tensor& video) const;
  /// The same, with upstream's stream_encode chunking (the first frame alone, then all the others in one call).
  at::Tensor encode_two_chunks(const at::Tensor& video) const;
  /// latents [B, z_dim, T, h, w] -> video [B, 3, 1 + 4(T - 1), 8h, 8w] clamped to [-1, 1] (WanVAE_.decode: one
  /// latent frame at a time through the causal cache).
  at::Tensor decode(const at::Tensor& latents) const;

  const VaeConfig& config() const { return config_; }
  c10::Device device() const { return device_; }
  c10::ScalarType dtype() const { return dtype_; }
  WanVaeModel& module() const;

 private:
  friend class StreamingDecoder;
  struct Scale;
  at::Tensor encode_chunks(const at::Tensor& video, const std::vector<int64_t>& bounds) const;
  /// Normalised latents -> video frames (fp32, not clamped) through `cache`, one latent frame at a time.
  at::Tensor decode_frames(const at::Tensor& latents, FeatureCache& cache) const;

  VaeConfig config_;
  c10::Device device_;
  c10::ScalarType dtype_;
  std::shared_ptr<WanVaeModel> module_;
  std::shared_ptr<Scale> scale_;
};

/// The streaming decoder of one stream (upstream WanVAE_.stream_decode): latent frames go in block by block, the
/// decoder's causal caches carry over between calls, so decoding [a ; b] in two calls equals decoding it in one.
/// The very first latent frame of a stream yields 1 video frame, every later one 4.
///
/// The real-time (TPP) pipeline primes it with the first 7 motion latents (decoded, output discarded) and then
/// decodes each block of 3 latent frames to 12 video frames; it drops the first 3 frames of the first block.
class StreamingDecoder {
 public:
  /// Keeps a reference to `vae`, which must outlive the decoder.
  explicit StreamingDecoder(const WanVae& vae);
  ~StreamingDecoder();
  StreamingDecoder(StreamingDecoder&&) noexcept;
  StreamingDecoder& operator=(StreamingDecoder&&) = delete;

  /// Decodes `latents` [B, z_dim, T, h, w] into the caches and discards the frames (upstream primes with
  /// motion_latents[:, :, :7]).
  void prime(const at::Tensor& latents);
  /// latents [B, z_dim, T, h, w] (a block: T = 3) -> [B, 3, 4T, 8h, 8w] in [-1, 1] (4T - 3 on an unprimed stream).
  /// Throws VaeError naming the block index if the output holds a NaN or an infinity (and resets the stream, whose
  /// caches then hold it too).
  at::Tensor decode_block(const at::Tensor& latents);
  /// Forgets the stream (the next call starts a new one).
  void reset();
  /// An independent decoder in the same state. The caches' tensors are shared: layers replace them, never write
  /// into them, so the copy costs no tensor memory until one of the two decodes again. A backend keeps a primed
  /// decoder and forks it for each new stream instead of priming again.
  StreamingDecoder fork() const;

  /// decode_block() calls since the last reset().
  int64_t blocks_decoded() const { return blocks_; }
  /// Latent frames decoded (primed or not) since the last reset().
  int64_t frames_seen() const { return frames_; }
  /// Bytes held by the causal caches of this stream (grows to its steady size after the first two latent frames).
  uint64_t cache_bytes() const;

 private:
  struct State;
  at::Tensor run(const at::Tensor& latents, const char* what);

  const WanVae* vae_;
  std::unique_ptr<State> state_;
  int64_t blocks_ = 0;
  int64_t frames_ = 0;
};

}  // namespace liveavatar::vae
