// AudioEncoder (loading, hidden states) and the whole-file feature path of upstream's encode_audio.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <sys/stat.h>

#include <cmath>

#include "weights/weights.h"
#include "wav2vec2.h"

namespace liveavatar::audio {
namespace {

bool is_file(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

void check_options(const FeatureOptions& o) {
  if (!(o.hidden_fps > 0) || !(o.feature_fps > 0) || o.video_fps <= 0 || o.batch_frames <= 0 || o.m < 0)
    throw AudioError("feature options: hidden_fps, feature_fps, video_fps and batch_frames must be positive and m >= 0"
                     " (got " + std::to_string(o.hidden_fps) + ", " + std::to_string(o.feature_fps) + ", " +
                     std::to_string(o.video_fps) + ", " + std::to_string(o.batch_frames) + ", " +
                     std::to_string(o.m) + ")");
}

at::Tensor as_samples(const at::Tensor& samples) {
  if (samples.dim() != 1 && !(samples.dim() == 2 && samples.size(0) == 1))
    throw AudioError("audio must be mono samples [N] (got shape " + std::to_string(samples.dim()) + "-D)");
  return samples.reshape({-1}).to(at::kFloat);
}

}  // namespace

at::Tensor normalize_waveform(const at::Tensor& samples) {
  const auto x = as_samples(samples).to(at::kDouble);
  if (x.numel() == 0) return x.to(at::kFloat);
  const auto mean = x.mean();
  const auto var = (x - mean).pow(2).mean();  // population variance, as numpy's var()
  return ((x - mean) / at::sqrt(var + 1e-7)).to(at::kFloat);
}

at::Tensor interpolate_hidden(const at::Tensor& hidden, const FeatureOptions& options) {
  check_options(options);
  if (hidden.dim() != 3) throw AudioError("interpolate_hidden: expected [L, T, D] hidden states");
  const int64_t t = hidden.size(1);
  const auto out_len = static_cast<int64_t>(static_cast<double>(t) / options.hidden_fps * options.feature_fps);
  if (out_len <= 0) return at::zeros({hidden.size(0), 0, hidden.size(2)}, hidden.options().dtype(at::kFloat));
  const auto x = hidden.to(at::kFloat).transpose(1, 2).contiguous();  // [L, D, T]
  return at::upsample_linear1d(x, {out_len}, /*align_corners=*/true).transpose(1, 2);  // [L, out, D]
}

std::vector<int64_t> video_frame_indices(int64_t frames, const FeatureOptions& options) {
  // np.linspace(0, frames / fps, frames, endpoint=False) * feature_fps, rounded half to even as np.round does.
  std::vector<int64_t> idx(static_cast<size_t>(std::max<int64_t>(frames, 0)));
  if (frames <= 0) return idx;
  const double stop = static_cast<double>(frames) / static_cast<double>(options.video_fps);
  const double step = stop / static_cast<double>(frames);
  for (int64_t i = 0; i < frames; ++i)
    idx[i] = static_cast<int64_t>(std::nearbyint(static_cast<double>(i) * step * options.feature_fps));
  return idx;
}

at::Tensor bucket_features(const at::Tensor& z, const FeatureOptions& o, int64_t* num_repeat) {
  check_options(o);
  if (z.dim() != 3) throw AudioError("bucket_features: expected [L, T, D] features at the feature rate");
  const int64_t layers = z.size(0), frames30 = z.size(1), dim = z.size(2);
  const double scale = o.feature_fps / static_cast<double>(o.video_fps);
  const int64_t batches = static_cast<int64_t>(static_cast<double>(frames30) / (o.batch_frames * scale)) + 1;
  const int64_t count = batches * o.batch_frames;
  const int64_t padded = static_cast<int64_t>(std::ceil(static_cast<double>(count) / o.video_fps * o.feature_fps));
  const int64_t stride = static_cast<int64_t>(o.feature_fps / static_cast<double>(o.video_fps));
  auto idx = video_frame_indices(count, o);
  const int64_t width = 2 * o.m + 1;
  auto out = at::zeros({count, layers, width, dim}, z.options().dtype(at::kFloat));
  const auto zf = z.to(at::kFloat);
  std::vector<int64_t> chosen;
  for (int64_t k = 0; k < count; ++k) {
    const int64_t bi = std::min(std::max<int64_t>(idx[k], 0), std::max<int64_t>(padded - 1, 0));
    if (bi >= frames30) continue;  // past the audio: zeros
    for (int64_t j = -o.m; j <= o.m; ++j)
      out[k].select(1, j + o.m).copy_(zf.select(1, std::min(std::max<int64_t>(bi + j * stride, 0), frames30 - 1)));
  }
  if (num_repeat) *num_repeat = batches;
  return out.reshape({count, layers, width * dim}).permute({1, 2, 0}).contiguous();  // [L, D * width, frames]
}

// ---------------------------------------------------------------------------------------------------------------

AudioEncoder::AudioEncoder(const Wav2Vec2Config& config, c10::Device device, c10::ScalarType dtype, uint64_t seed)
    : config_(config), device_(device), dtype_(dtype) {
  config_.validate();
  module_ = std::make_shared<Wav2Vec2Model>(config_);
  randomize_parameters(**module_, seed);
  (*module_)->to(device_, dtype_);
  (*module_)->eval();
}

AudioEncoder::~AudioEncoder() = default;
AudioEncoder::AudioEncoder(AudioEncoder&&) noexcept = default;
AudioEncoder& AudioEncoder::operator=(AudioEncoder&&) noexcept = default;

AudioEncoder AudioEncoder::from_folder(const std::string& folder, c10::Device device, c10::ScalarType dtype) {
  const std::string config_path = folder + "/config.json";
  if (!is_file(config_path))
    throw AudioError(config_path + ": missing. The wav2vec2 folder must be an HF model folder (config.json, "
                     "preprocessor_config.json, model.safetensors or pytorch_model.bin), e.g. the checkpoint's "
                     "wav2vec2-large-xlsr-53-english");
  AudioEncoder encoder(Wav2Vec2Config::from_json_file(config_path), device, dtype);
  const std::string st = folder + "/model.safetensors", bin = folder + "/pytorch_model.bin";
  if (is_file(st)) encoder.load(weights::load_safetensors(st));
  else if (is_file(bin)) encoder.load(weights::load_pth(bin));
  else throw AudioError(folder + ": neither model.safetensors nor pytorch_model.bin is there (the wav2vec2 weights)");
  return encoder;
}

void AudioEncoder::load(const weights::Checkpoint& checkpoint) {
  weights::ModuleLoadOptions opts;
  opts.assign = false;  // copy into our tensors (device / dtype of this encoder)
  opts.cast_dtype = true;
  weights::load_into_module(**module_, map_hf_checkpoint(checkpoint), opts);
}

Wav2Vec2Model& AudioEncoder::module() const { return *module_; }

uint64_t AudioEncoder::parameter_count() const {
  uint64_t n = 0;
  for (const auto& p : (*module_)->parameters()) n += static_cast<uint64_t>(p.numel());
  return n;
}

at::Tensor AudioEncoder::hidden_states(const at::Tensor& input_values) const {
  const auto x = as_samples(input_values);
  if (config_.frames_for_samples(x.numel()) == 0)
    throw AudioError("audio of " + std::to_string(x.numel()) + " samples is shorter than one wav2vec2 frame (" +
                     std::to_string(config_.receptive_field()) + " samples)");
  at::NoGradGuard no_grad;
  const auto states = (*module_)->forward(x.to(device_, dtype_).unsqueeze(0));
  return at::cat(states, 0).to(at::kCPU, at::kFloat);  // [layers + 1, T, D]
}

at::Tensor AudioEncoder::encode(const at::Tensor& samples) const {
  return hidden_states(config_.do_normalize ? normalize_waveform(samples) : as_samples(samples));
}

at::Tensor AudioEncoder::features(const at::Tensor& samples, const FeatureOptions& options,
                                  int64_t* num_repeat) const {
  return bucket_features(interpolate_hidden(encode(samples), options), options, num_repeat);
}

}  // namespace liveavatar::audio
