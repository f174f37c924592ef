// VaeConfig, WanVae (chunked encode / decode, upstream WanVAE_ + Wan2_1_VAE) and the StreamingDecoder
// (WanVAE_.stream_decode). SPDX-License-Identifier: LGPL-2.1-or-later
#include <sstream>

#include "vae/vae.h"
#include "weights/weights.h"
#include "modules.h"

namespace liveavatar::vae {

// ---------------------------------------------------------------------------------------------------------------
// VaeConfig
// ---------------------------------------------------------------------------------------------------------------
VaeConfig VaeConfig::tiny() {
  VaeConfig c;
  c.dim = 16;
  return c;
}

VaeConfig VaeConfig::from_checkpoint(const weights::Checkpoint& checkpoint) {
  auto dim0 = [&](const std::string& key) {
    const auto it = checkpoint.tensors.find(key);
    if (it == checkpoint.tensors.end() || it->second.dim() != 5)
      throw VaeError("VAE checkpoint: no 5-D '" + key + "'; is this a Wan2.1 VAE state dict (Wan2.1_VAE.pth)?");
    return it->second.size(0);
  };
  VaeConfig c;
  c.dim = dim0("encoder.conv1.weight");
  c.z_dim = dim0("conv2.weight");
  return c;
}

void VaeConfig::validate() const {
  auto fail = [](const std::string& m) { throw VaeError("VAE config: " + m); };
  if (dim <= 0 || dim % 2 != 0) fail("dim must be a positive even number (upsamplers halve it), got " + std::to_string(dim));
  if (z_dim <= 0) fail("z_dim must be positive, got " + std::to_string(z_dim));
  if (dim_mult.size() != 4)
    fail("dim_mult must have 4 levels (the decoder's channel layout is fixed upstream), got " +
         std::to_string(dim_mult.size()));
  for (int64_t m : dim_mult)
    if (m <= 0) fail("dim_mult entries must be positive");
  if (num_res_blocks < 1) fail("num_res_blocks must be >= 1, got " + std::to_string(num_res_blocks));
  if (temperal_downsample.size() != dim_mult.size() - 1)
    fail("temperal_downsample needs one flag per downsampling level (" + std::to_string(dim_mult.size() - 1) +
         "), got " + std::to_string(temperal_downsample.size()));
  if (latent_mean.size() != static_cast<size_t>(z_dim) || latent_std.size() != static_cast<size_t>(z_dim))
    fail("latent_mean and latent_std need z_dim = " + std::to_string(z_dim) + " values, got " +
         std::to_string(latent_mean.size()) + " and " + std::to_string(latent_std.size()));
  for (double s : latent_std)
    if (!(s > 0)) fail("latent_std values must be positive");
}

int64_t VaeConfig::spatial_stride() const { return int64_t{1} << (dim_mult.size() - 1); }

int64_t VaeConfig::temporal_stride() const {
  int64_t s = 1;
  for (bool t : temperal_downsample) s *= t ? 2 : 1;
  return s;
}

uint64_t VaeConfig::parameter_count() const {
  validate();
  auto conv = [](int64_t in, int64_t out, int64_t k) { return static_cast<uint64_t>(in * out * k + out); };
  auto res = [&](int64_t in, int64_t out) {
    return static_cast<uint64_t>(in + out) + conv(in, out, 27) + conv(out, out, 27) + (in != out ? conv(in, out, 1) : 0);
  };
  auto attn = [&](int64_t c) { return static_cast<uint64_t>(c) + conv(c, 3 * c, 1) + conv(c, c, 1); };
  auto count_scales = [&](double scale) {
    for (double s : attn_scales)
      if (s == scale) return true;
    return false;
  };
  const size_t levels = dim_mult.size();
  uint64_t n = 0;
  // encoder
  std::vector<int64_t> dims{dim};
  for (int64_t m : dim_mult) dims.push_back(dim * m);
  n += conv(3, dims[0], 27);
  double scale = 1.0;
  for (size_t i = 0; i < levels; ++i) {
    int64_t in = dims[i];
    for (int64_t r = 0; r < num_res_blocks; ++r) {
      n += res(in, dims[i + 1]);
      if (count_scales(scale)) n += attn(dims[i + 1]);
      in = dims[i + 1];
    }
    if (i + 1 != levels) {
      const int64_t c = dims[i + 1];
      n += conv(c, c, 9) + (temperal_downsample[i] ? conv(c, c, 3) : 0);
      scale /= 2.0;
    }
  }
  const int64_t top = dims.back();
  n += 2 * res(top, top) + attn(top) + static_cast<uint64_t>(top) + conv(top, 2 * z_dim, 27);
  n += conv(2 * z_dim, 2 * z_dim, 1) + conv(z_dim, z_dim, 1);
  // decoder
  std::vector<int64_t> up{dim * dim_mult.back()};
  for (size_t i = levels; i-- > 0;) up.push_back(dim * dim_mult[i]);
  n += conv(z_dim, up[0], 27) + 2 * res(up[0], up[0]) + attn(up[0]);
  scale = 1.0 / static_cast<double>(int64_t{1} << (levels - 2));
  for (size_t i = 0; i < levels; ++i) {
    int64_t in = (i >= 1 && i <= 3) ? up[i] / 2 : up[i];
    for (int64_t r = 0; r < num_res_blocks + 1; ++r) {
      n += res(in, up[i + 1]);
      if (count_scales(scale)) n += attn(up[i + 1]);
      in = up[i + 1];
    }
    if (i + 1 != levels) {
      const int64_t c = up[i + 1];
      n += conv(c, c / 2, 9) + (temperal_downsample[levels - 2 - i] ? conv(c, 2 * c, 3) : 0);
      scale *= 2.0;
    }
  }
  n += static_cast<uint64_t>(up.back()) + conv(up.back(), 3, 27);
  return n;
}

// ---------------------------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------------------------
namespace {

std::string shape_of(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

void check_video(const at::Tensor& video, const VaeConfig& cfg) {
  if (!video.defined() || video.dim() != 5 || video.size(1) != 3)
    throw VaeError("VAE encode: video must be [B, 3, T, H, W] with values in [-1, 1], got " +
                   (video.defined() ? shape_of(video) : std::string("an undefined tensor")));
  const int64_t s = cfg.spatial_stride(), ts = cfg.temporal_stride();
  const int64_t t = video.size(2), h = video.size(3), w = video.size(4);
  if (h < s || w < s)
    throw VaeError("VAE encode: image " + std::to_string(w) + "x" + std::to_string(h) + " is smaller than one latent "
                   "pixel (" + std::to_string(s) + "x" + std::to_string(s) + " px); resize it to at least that");
  if (h % s != 0 || w % s != 0)
    throw VaeError("VAE encode: width and height must be multiples of " + std::to_string(s) + ", got " +
                   std::to_string(w) + "x" + std::to_string(h) + "; crop or resize to " +
                   std::to_string(w / s * s) + "x" + std::to_string(h / s * s) +
                   " (the DiT further needs multiples of " + std::to_string(2 * s) + ")");
  if (t < 1 || (t - 1) % ts != 0)
    throw VaeError("VAE encode: the clip must have 1 + " + std::to_string(ts) + "k frames, got " + std::to_string(t) +
                   "; trim it to " + std::to_string(t < 1 ? 1 : 1 + (t - 1) / ts * ts) + " frames");
}

void check_latents(const at::Tensor& z, const VaeConfig& cfg, const char* what) {
  if (!z.defined() || z.dim() != 5 || z.size(1) != cfg.z_dim || z.size(2) < 1 || z.size(3) < 1 || z.size(4) < 1)
    throw VaeError(std::string(what) + ": latents must be [B, " + std::to_string(cfg.z_dim) +
                   ", T >= 1, h >= 1, w >= 1], got " + (z.defined() ? shape_of(z) : std::string("an undefined tensor")));
}

/// Index along dim 2 of the first frame that holds a NaN or an infinity, or -1.
int64_t first_bad_frame(const at::Tensor& x) {
  if (at::isfinite(x).all().item<bool>()) return -1;
  const auto bad = at::logical_not(at::isfinite(x)).transpose(0, 2).flatten(1).any(1);  // [T]
  return at::argmax(bad.to(at::kInt)).item<int64_t>();
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// WanVae
// ---------------------------------------------------------------------------------------------------------------
struct WanVae::Scale {
  at::Tensor mean;     // [1, z, 1, 1, 1] in the model dtype
  at::Tensor inv_std;  // 1 / std, computed in the model dtype as upstream does
};

WanVae::WanVae(const VaeConfig& config, c10::Device device, c10::ScalarType dtype, uint64_t seed)
    : config_(config), device_(device), dtype_(dtype) {
  config_.validate();
  if (dtype != at::kFloat && dtype != at::kBFloat16 && dtype != at::kHalf)
    throw VaeError("VAE dtype must be float32, bfloat16 or float16");
  module_ = std::make_shared<WanVaeModel>(config_);
  (*module_)->eval();
  randomize_parameters(**module_, seed);
  (*module_)->to(device, dtype);
  const auto opts = at::TensorOptions().dtype(dtype);
  scale_ = std::make_shared<Scale>();
  scale_->mean = at::tensor(config_.latent_mean, at::kDouble).to(opts).view({1, -1, 1, 1, 1}).to(device);
  scale_->inv_std = (1.0 / at::tensor(config_.latent_std, at::kDouble).to(opts)).view({1, -1, 1, 1, 1}).to(device);
}

WanVae::~WanVae() = default;

WanVaeModel& WanVae::module() const { return *module_; }

void WanVae::load(const weights::Checkpoint& checkpoint) {
  weights::ModuleLoadOptions options;
  options.assign = false;  // copy into the module's tensors (device and dtype kept)
  options.cast_dtype = true;
  weights::load_into_module(**module_, checkpoint, options);
}

void WanVae::load_file(const std::string& path) {
  const std::string ext = ".safetensors";
  const bool st = path.size() >= ext.size() && path.compare(path.size() - ext.size(), ext.size(), ext) == 0;
  load(st ? weights::load_safetensors(path) : weights::load_pth(path));
}

at::Tensor WanVae::encode_chunks(const at::Tensor& video, const std::vector<int64_t>& bounds) const {
  at::NoGradGuard no_grad;
  auto& m = **module_;
  const auto x = video.to(device_, dtype_);
  FeatureCache cache;
  std::vector<at::Tensor> outs;
  for (size_t i = 0; i + 1 < bounds.size(); ++i) {
    cache.rewind();
    outs.push_back(m.encoder->forward(x.slice(2, bounds[i], bounds[i + 1]), cache));
  }
  const auto moments = m.conv1->forward(outs.size() == 1 ? outs[0] : at::cat(outs, 2));  // [B, 2z, T', h, w]
  const auto mu = moments.slice(1, 0, config_.z_dim);
  const auto out = ((mu - scale_->mean) * scale_->inv_std).to(at::kFloat);
  const int64_t bad = first_bad_frame(out);
  if (bad >= 0)
    throw VaeError("VAE encode: NaN or infinity in latent frame " + std::to_string(bad) + " (encoder chunk " +
                   std::to_string(bad) + "); check the input video for NaN and the weights, or use float32");
  return out;
}

at::Tensor WanVae::encode(const at::Tensor& video) const {
  check_video(video, config_);
  const int64_t ts = config_.temporal_stride();
  std::vector<int64_t> bounds{0};
  for (int64_t t = 1; t <= video.size(2); t += ts) bounds.push_back(t);
  return encode_chunks(video, bounds);
}

at::Tensor WanVae::encode_two_chunks(const at::Tensor& video) const {
  check_video(video, config_);
  std::vector<int64_t> bounds{0, 1};
  if (video.size(2) > 1) bounds.push_back(video.size(2));
  return encode_chunks(video, bounds);
}

at::Tensor WanVae::decode_frames(const at::Tensor& latents, FeatureCache& cache) const {
  at::NoGradGuard no_grad;
  auto& m = **module_;
  const auto z = latents.to(device_, dtype_) / scale_->inv_std + scale_->mean;
  const auto x = m.conv2->forward(z);
  std::vector<at::Tensor> outs;
  for (int64_t i = 0; i < x.size(2); ++i) {
    cache.rewind();
    outs.push_back(m.decoder->forward(x.slice(2, i, i + 1), cache));
  }
  return (outs.size() == 1 ? outs[0] : at::cat(outs, 2)).to(at::kFloat);
}

at::Tensor WanVae::decode(const at::Tensor& latents) const {
  check_latents(latents, config_, "VAE decode");
  FeatureCache cache;
  const auto out = decode_frames(latents, cache);
  const int64_t bad = first_bad_frame(out);
  if (bad >= 0) {
    const int64_t latent = bad == 0 ? 0 : 1 + (bad - 1) / config_.temporal_stride();
    throw VaeError("VAE decode: NaN or infinity in video frame " + std::to_string(bad) + " (latent frame " +
                   std::to_string(latent) + "); check the latents and the weights, or use float32");
  }
  return out.clamp_(-1, 1);
}

// ---------------------------------------------------------------------------------------------------------------
// StreamingDecoder
// ---------------------------------------------------------------------------------------------------------------
struct StreamingDecoder::State {
  FeatureCache cache;
  std::vector<int64_t> shape;  // B, h, w of the stream
};

StreamingDecoder::StreamingDecoder(const WanVae& vae) : vae_(&vae), state_(std::make_unique<State>()) {}
StreamingDecoder::~StreamingDecoder() = default;
StreamingDecoder::StreamingDecoder(StreamingDecoder&&) noexcept = default;

StreamingDecoder StreamingDecoder::fork() const {
  StreamingDecoder copy(*vae_);
  *copy.state_ = *state_;
  copy.blocks_ = blocks_;
  copy.frames_ = frames_;
  return copy;
}

void StreamingDecoder::reset() {
  state_->cache.clear();
  state_->shape.clear();
  blocks_ = 0;
  frames_ = 0;
}

at::Tensor StreamingDecoder::run(const at::Tensor& latents, const char* what) {
  check_latents(latents, vae_->config(), what);
  const std::vector<int64_t> shape{latents.size(0), latents.size(3), latents.size(4)};
  if (!state_->shape.empty() && shape != state_->shape)
    throw VaeError(std::string(what) + ": latents [B, C, T, h, w] = " + shape_of(latents) + " change B, h or w " +
                   "within a stream (was B " + std::to_string(state_->shape[0]) + ", h " +
                   std::to_string(state_->shape[1]) + ", w " + std::to_string(state_->shape[2]) +
                   "); call reset() to start a new stream");
  try {
    auto out = vae_->decode_frames(latents, state_->cache);
    state_->shape = shape;
    frames_ += latents.size(2);
    return out;
  } catch (...) {
    reset();  // a half-updated cache would corrupt the next block
    throw;
  }
}

uint64_t StreamingDecoder::cache_bytes() const { return state_->cache.bytes(); }

void StreamingDecoder::prime(const at::Tensor& latents) { run(latents, "VAE stream prime"); }

at::Tensor StreamingDecoder::decode_block(const at::Tensor& latents) {
  auto out = run(latents, "VAE stream decode");
  const int64_t block = blocks_++;
  const int64_t bad = first_bad_frame(out);
  if (bad >= 0) {
    reset();  // the caches hold the NaN now: the next block starts a new stream
    throw VaeError("VAE stream decode: NaN or infinity in block " + std::to_string(block) + " (video frame " +
                   std::to_string(bad) + " of the block); check the DiT latents of that block");
  }
  return out.clamp_(-1, 1);
}

}  // namespace liveavatar::vae
