// AudioStream: incremental wav2vec2 features for live audio, with bounded left context.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>

#include "audio/audio_encoder.h"

namespace liveavatar::audio {
namespace {

struct Tap {
  int64_t f0;  // 50 Hz frame
  double w;    // weight of f0 + 1
};

// The 50 Hz position of 30 Hz frame j on the stream's fixed grid (align_corners in the limit of a long clip).
Tap tap_for(int64_t j, const FeatureOptions& o) {
  const double p = static_cast<double>(j) * o.hidden_fps / o.feature_fps;
  const auto f0 = static_cast<int64_t>(std::floor(p));
  return {f0, p - static_cast<double>(f0)};
}

// The 30 Hz frame that video frame k takes (round(1.2 k) at 25 fps, half to even like np.round).
int64_t index30(int64_t k, const FeatureOptions& o) {
  return static_cast<int64_t>(std::nearbyint(static_cast<double>(k) * o.feature_fps / static_cast<double>(o.video_fps)));
}

}  // namespace

AudioStream::AudioStream(const AudioEncoder& encoder, StreamOptions options)
    : encoder_(&encoder), options_(std::move(options)) {
  const auto& o = options_.features;
  if (!(options_.left_context_s >= 0) || !(options_.lookahead_s >= 0) || options_.min_frames <= 0)
    throw AudioError("stream options: left_context_s and lookahead_s must be >= 0 and min_frames > 0");
  if (!(o.hidden_fps > 0) || !(o.feature_fps > 0) || o.video_fps <= 0 || o.m < 0)
    throw AudioError("stream options: hidden_fps, feature_fps and video_fps must be positive and m >= 0");
}

void AudioStream::push(const at::Tensor& samples) {
  const auto x = samples.reshape({-1}).to(at::kFloat).contiguous();
  push(x.data_ptr<float>(), static_cast<size_t>(x.numel()));
}

void AudioStream::push(const float* samples, size_t count) {
  if (finished_) throw AudioError("AudioStream::push after finish(): start a new stream");
  buffer_.insert(buffer_.end(), samples, samples + count);
  samples_in_ += static_cast<int64_t>(count);
}

int64_t AudioStream::frames_ready(bool at_end) const {
  const auto& c = encoder_->config();
  const int64_t sr = c.sampling_rate, fps = options_.features.video_fps;
  const int64_t total = (samples_in_ * fps + sr - 1) / sr;  // ceil: frames that show any pushed sample
  if (at_end) return total;
  const auto lookahead = static_cast<int64_t>(std::llround(options_.lookahead_s * static_cast<double>(sr)));
  const int64_t have = c.frames_for_samples(samples_in_ - lookahead);  // 50 Hz frames with their lookahead
  int64_t k = frames_out_;
  while (k < total) {
    const auto j = index30(k, options_.features) + options_.features.m;
    const auto t = tap_for(j, options_.features);
    if (t.f0 + (t.w > 0 ? 1 : 0) >= have) break;
    ++k;
  }
  return k;
}

at::Tensor AudioStream::pop() {
  const int64_t ready = frames_ready(/*at_end=*/false);
  const int64_t n = ready - frames_out_;
  if (n < options_.min_frames) {
    const auto& c = encoder_->config();
    return at::zeros({c.num_hidden_states(), c.hidden_size * (2 * options_.features.m + 1), 0});
  }
  if (options_.exact_groups) return encode_groups(n / options_.min_frames);
  return encode_frames(frames_out_, n, /*at_end=*/false);
}

at::Tensor AudioStream::finish() {
  finished_ = true;
  at::Tensor head;
  if (options_.exact_groups) {
    // The whole groups exactly as pop() would have encoded them, then the tail.
    const int64_t whole = (frames_ready(/*at_end=*/false) - frames_out_) / std::max<int64_t>(options_.min_frames, 1);
    if (whole > 0) head = encode_groups(whole);
  }
  const int64_t n = frames_ready(/*at_end=*/true) - frames_out_;
  const auto tail = encode_frames(frames_out_, std::max<int64_t>(n, 0), /*at_end=*/true);
  return head.defined() ? at::cat({head, tail}, 2) : tail;
}

at::Tensor AudioStream::encode_groups(int64_t groups) {
  std::vector<at::Tensor> parts;
  for (int64_t g = 0; g < groups; ++g) parts.push_back(encode_frames(frames_out_, options_.min_frames, false));
  return parts.size() == 1 ? parts[0] : at::cat(parts, 2);
}

at::Tensor AudioStream::encode_frames(int64_t first, int64_t count, bool at_end) {
  const auto& c = encoder_->config();
  const auto& o = options_.features;
  const int64_t layers = c.num_hidden_states(), dim = c.hidden_size, width = 2 * o.m + 1;
  auto out = at::zeros({count, layers, width, dim});
  if (count == 0) return out.reshape({count, layers, width * dim}).permute({1, 2, 0});
  const int64_t hop = c.hop(), field = c.receptive_field(), sr = c.sampling_rate;
  const int64_t available = c.frames_for_samples(samples_in_);  // 50 Hz frames the audio so far makes

  // 30 Hz indices per frame and the 50 Hz frames they need.
  std::vector<std::vector<Tap>> taps(static_cast<size_t>(count));
  int64_t lo = INT64_MAX, hi = -1;
  for (int64_t k = 0; k < count; ++k) {
    for (int64_t j = -o.m; j <= o.m; ++j) {
      auto t = tap_for(std::max<int64_t>(index30(first + k, o) + j, 0), o);
      lo = std::min(lo, t.f0);
      hi = std::max(hi, t.f0 + (t.w > 0 ? 1 : 0));
      taps[k].push_back(t);
    }
  }
  if (available == 0) return out.reshape({count, layers, width * dim}).permute({1, 2, 0});  // too short: silence
  hi = std::min(hi, available - 1);
  lo = std::min(lo, hi);

  // Window: left context before frame lo (aligned to the hop so that window frames sit on the global grid), and up
  // to the lookahead after frame hi.
  const auto context = static_cast<int64_t>(std::llround(options_.left_context_s * static_cast<double>(sr)));
  const auto lookahead = static_cast<int64_t>(std::llround(options_.lookahead_s * static_cast<double>(sr)));
  int64_t s0 = std::max<int64_t>(0, lo * hop - context);
  s0 = std::max(s0 / hop * hop, buffer_start_ + (hop - buffer_start_ % hop) % hop);
  const int64_t s1 = at_end ? samples_in_ : std::min(samples_in_, hi * hop + field + lookahead);
  const auto window = at::from_blob(buffer_.data() + (s0 - buffer_start_), {s1 - s0}, at::kFloat).clone();
  const auto z = encoder_->encode(window);  // [L, Tw, D]
  const int64_t base = s0 / hop, tw = z.size(1);
  auto frame = [&](int64_t f) {
    const int64_t local = std::min(std::max<int64_t>(f, 0), available - 1) - base;
    return z.select(1, std::min(std::max<int64_t>(local, 0), tw - 1));  // [L, D]
  };
  for (int64_t k = 0; k < count; ++k) {
    for (int64_t j = 0; j < width; ++j) {
      const auto& t = taps[k][j];
      auto v = frame(t.f0);
      if (t.w > 0) v = v * (1.0 - t.w) + frame(t.f0 + 1) * t.w;
      out[k].select(1, j).copy_(v);
    }
  }
  frames_out_ += count;

  // Keep what the next frames' left context can still reach.
  if (!at_end) {
    const auto next = tap_for(std::max<int64_t>(index30(frames_out_, o) - o.m, 0), o);
    const int64_t keep_from = std::max<int64_t>(0, std::max<int64_t>(next.f0, 0) * hop - context) / hop * hop;
    if (keep_from > buffer_start_) {
      buffer_.erase(buffer_.begin(), buffer_.begin() + (keep_from - buffer_start_));
      buffer_start_ = keep_from;
    }
  }
  return out.reshape({count, layers, width * dim}).permute({1, 2, 0}).contiguous();  // [L, D * width, n]
}

}  // namespace liveavatar::audio
