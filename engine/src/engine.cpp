// Engine: validation, audio framing and the exact-length tail, on top of a Backend.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "liveavatar/engine.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <map>
#include <mutex>
#include <string>

#include "backend.h"

namespace liveavatar {

namespace {

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::map<std::string, BackendFactory>& registry() {
  static std::map<std::string, BackendFactory> r{{"puppet", &make_puppet_backend}};
  return r;
}

std::string size_text(int w, int h) { return std::to_string(w) + "x" + std::to_string(h); }

void check_size(Size s, const char* what) {
  if (s.width == 0 && s.height == 0) return;
  if (s.width < kMinReferenceSide || s.height < kMinReferenceSide || s.width > 8192 || s.height > 8192 ||
      s.width % 2 || s.height % 2)
    throw Error(std::string(what) + " " + size_text(s.width, s.height) +
                " is not usable: width and height must be even and between " + std::to_string(kMinReferenceSide) +
                " and 8192 (or both 0 for the default)");
}

RgbImage to_rgb(const ImageView& v) {
  if (!v.data) throw Error("reference image has no pixel data");
  if (v.width < kMinReferenceSide || v.height < kMinReferenceSide)
    throw Error("reference image " + size_text(v.width, v.height) + " is too small: give a portrait of at least " +
                std::to_string(kMinReferenceSide) + "x" + std::to_string(kMinReferenceSide) +
                " pixels (a face of 100 pixels or more works best)");
  if (v.width > 16384 || v.height > 16384)
    throw Error("reference image " + size_text(v.width, v.height) + " is too large: the limit is 16384 per side");
  const int bpp = v.format == PixelFormat::kRGB8 ? 3 : v.format == PixelFormat::kRGBA8 ? 4 : 1;
  if (v.stride < v.width * bpp)
    throw Error("reference image stride " + std::to_string(v.stride) + " is smaller than width x bytes per pixel");
  RgbImage out;
  out.width = v.width;
  out.height = v.height;
  out.data.resize(static_cast<size_t>(v.width) * v.height * 3);
  for (int y = 0; y < v.height; ++y) {
    const uint8_t* s = v.data + static_cast<size_t>(y) * v.stride;
    uint8_t* d = out.data.data() + static_cast<size_t>(y) * v.width * 3;
    for (int x = 0; x < v.width; ++x, d += 3) {
      if (bpp == 1) {
        d[0] = d[1] = d[2] = s[x];
      } else {
        // Alpha is dropped: a transparent background shows its stored colour, as most viewers do.
        const uint8_t* p = s + static_cast<size_t>(x) * bpp;
        d[0] = p[0];
        d[1] = p[1];
        d[2] = p[2];
      }
    }
  }
  return out;
}

class EngineImpl final : public Engine {
 public:
  explicit EngineImpl(const EngineConfig& config) : config_(config) {
    if (config.sample_rate <= 0 || config.fps_n <= 0 || config.fps_d <= 0)
      throw Error("sample_rate and fps must be positive");
    const int64_t num = static_cast<int64_t>(config.sample_rate) * config.fps_d;
    if (num % config.fps_n != 0)
      throw Error("sample_rate " + std::to_string(config.sample_rate) + " x fps_d / fps_n " +
                  std::to_string(config.fps_n) + " is not a whole number of samples per frame: use 16000 Hz at 25 fps");
    spf_ = static_cast<int>(num / config.fps_n);
    requested_ = {config.width, config.height};
    check_size(requested_, "output size");
    if ((requested_.width == 0) != (requested_.height == 0))
      throw Error("set both width and height, or neither (then they follow the reference)");
    BackendFactory factory = nullptr;
    {
      std::lock_guard<std::mutex> lock(registry_mutex());
      auto it = registry().find(config.backend);
      if (it != registry().end()) factory = it->second;
    }
    if (!factory) {
      std::string names;
      for (const auto& n : backend_names()) names += (names.empty() ? "" : ", ") + n;
      if (config.backend == "liveavatar")
        throw Error("backend 'liveavatar' is not built into this engine (it needs LibTorch: run scripts/setup.sh and "
                    "rebuild); available backends are " + names);
      throw Error("unknown backend '" + config.backend + "': available backends are " + names);
    }
    backend_ = factory(config);
    backend_->set_cancel_flag(&cancel_);
    pending_.reserve(spf_);
  }

  void set_reference(const ImageView& image) override {
    RgbImage rgb = to_rgb(image);
    Size out = requested_.width ? requested_ : default_output_size(rgb.width, rgb.height);
    backend_->set_reference(rgb, out, &warnings_);
    size_ = out;
    reference_width_ = rgb.width;
    reference_height_ = rgb.height;
    has_reference_ = true;
  }
  bool has_reference() const override { return has_reference_; }

  void set_output_size(Size size) override {
    check_size(size, "output size");
    requested_ = size;
    if (!has_reference_) return;
    Size out = size.width ? size : default_output_size(reference_width_, reference_height_);
    backend_->set_output_size(out);
    size_ = out;
  }
  Size output_size() const override { return has_reference_ ? size_ : requested_; }
  FaceLayout face_layout() const override { return has_reference_ ? backend_->face_layout() : FaceLayout{}; }

  void push_audio(const float* samples, size_t count) override {
    check_can_push();
    if (count && !samples) throw Error("push_audio: null samples");
    size_t i = 0;
    // Complete the partial frame first, then hand over whole frames straight from the caller's buffer.
    if (!pending_.empty()) {
      size_t take = std::min(count, static_cast<size_t>(spf_) - pending_.size());
      pending_.insert(pending_.end(), samples, samples + take);
      i = take;
      if (static_cast<int>(pending_.size()) == spf_) {
        sanitize(pending_.data(), spf_);
        backend_->push_audio_frames(pending_.data(), 1);
        pending_.clear();
      }
    }
    const size_t whole = (count - i) / spf_;
    if (whole) {
      scratch_.assign(samples + i, samples + i + whole * spf_);
      sanitize(scratch_.data(), scratch_.size());
      backend_->push_audio_frames(scratch_.data(), static_cast<int>(whole));
      i += whole * spf_;
    }
    pending_.insert(pending_.end(), samples + i, samples + count);
    samples_ += static_cast<int64_t>(count);
  }

  void push_silence(size_t count) override {
    check_can_push();
    std::vector<float> zeros(std::min<size_t>(count, 1u << 16), 0.f);
    while (count) {
      size_t n = std::min(count, zeros.size());
      push_audio(zeros.data(), n);
      count -= n;
    }
  }

  bool pop_frame(Frame* frame) override {
    if (!frame) throw Error("pop_frame: null frame");
    if (!has_reference_) return false;
    if (finished_ && next_index_ >= total_frames_) return false;
    if (!backend_->render_next(frame)) return false;
    if (frame->index != next_index_)
      throw Error("internal error: backend produced frame " + std::to_string(frame->index) + ", expected " +
                  std::to_string(next_index_));
    ++next_index_;
    return true;
  }

  void finish() override {
    if (finished_) return;
    finished_ = true;
    total_frames_ = (samples_ + spf_ - 1) / spf_;
    if (!pending_.empty()) {
      pending_.resize(spf_, 0.f);  // pad the tail with silence: one last frame covers it
      sanitize(pending_.data(), spf_);
      backend_->push_audio_frames(pending_.data(), 1);
      pending_.clear();
    }
    if (has_reference_) backend_->finish(total_frames_);
  }

  void cancel() override { cancel_ = true; }

  void reset() override {
    cancel_ = false;
    pending_.clear();
    samples_ = 0;
    next_index_ = 0;
    total_frames_ = 0;
    finished_ = false;
    backend_->reset();
  }

  int samples_per_frame() const override { return spf_; }
  int64_t samples_pushed() const override { return samples_; }
  std::vector<std::string> take_warnings() override {
    std::vector<std::string> w;
    w.swap(warnings_);
    return w;
  }

 private:
  void check_can_push() const {
    if (!has_reference_)
      throw Error("audio arrived before the reference image: set a portrait first (link the image pad)");
    if (finished_) throw Error("audio pushed after finish(): call reset() to start a new stream");
  }
  // NaN / Inf would poison the smoothing state for the rest of the stream; clip like a DAC would.
  static void sanitize(float* s, size_t n) {
    for (size_t k = 0; k < n; ++k) {
      if (!std::isfinite(s[k])) s[k] = 0.f;
      s[k] = std::clamp(s[k], -1.f, 1.f);
    }
  }

  EngineConfig config_;
  std::unique_ptr<Backend> backend_;
  int spf_ = 640;
  Size requested_;
  Size size_;
  int reference_width_ = 0, reference_height_ = 0;
  bool has_reference_ = false;
  std::vector<float> pending_;  // samples of the incomplete frame
  std::vector<float> scratch_;
  int64_t samples_ = 0;
  int64_t next_index_ = 0;
  int64_t total_frames_ = 0;
  bool finished_ = false;
  std::vector<std::string> warnings_;
  std::atomic<bool> cancel_{false};
};

}  // namespace

Size default_output_size(int w, int h) {
  if (w < kMinReferenceSide || h < kMinReferenceSide)
    throw Error("reference image " + size_text(w, h) + " is too small: at least " +
                std::to_string(kMinReferenceSide) + " pixels per side");
  double scale = std::min(1.0, static_cast<double>(kMaxDefaultSide) / std::max(w, h));
  int ow = static_cast<int>(std::floor(w * scale)) / 16 * 16;
  int oh = static_cast<int>(std::floor(h * scale)) / 16 * 16;
  return {std::max(ow, kMinReferenceSide), std::max(oh, kMinReferenceSide)};
}

void register_backend(const std::string& name, BackendFactory factory) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[name] = factory;
}

std::vector<std::string> backend_names() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  std::vector<std::string> names;
  for (const auto& kv : registry()) names.push_back(kv.first);
  return names;
}

std::unique_ptr<Engine> Engine::create(const EngineConfig& config) { return std::make_unique<EngineImpl>(config); }

}  // namespace liveavatar
