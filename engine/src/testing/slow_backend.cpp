// Tests only: a backend that behaves like a slow block model (blocks of 12 frames, a fixed time per block), drawing
// its frames with another backend. The element's lag handling is tested with it without model weights. Like the
// neural model it denoises in 4 steps of equal cost: a block made with fewer steps (set_steps) takes that share of
// the time. With config.testing_slow_blocks > 0 only the first blocks are slow, later ones take a tenth of the time.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <algorithm>
#include <chrono>
#include <thread>

#include "../backend.h"

namespace liveavatar {

namespace {

constexpr int kBlockFrames = 12;  // as the neural backend
constexpr int kSteps = 4;         // as the neural backend

class SlowBackend final : public Backend {
 public:
  SlowBackend(std::unique_ptr<Backend> inner, int block_ms, int slow_blocks)
      : inner_(std::move(inner)), block_ms_(block_ms), slow_blocks_(slow_blocks) {}

  void set_reference(const RgbImage& image, Size output, std::vector<std::string>* warnings) override {
    inner_->set_reference(image, output, warnings);
  }
  void set_output_size(Size output) override { inner_->set_output_size(output); }
  FaceLayout face_layout() const override { return inner_->face_layout(); }
  void push_audio_frames(const float* samples, int frames) override {
    inner_->push_audio_frames(samples, frames);
    held_ += frames;
  }
  // Frames come out a whole block at a time, each block after block_ms of (cancellable) sleep.
  bool render_next(Frame* frame) override {
    if (ready_ == 0) {
      if (held_ < kBlockFrames && !at_end_) return false;
      if (held_ == 0) return false;
      sleep_block();
      last_steps_ = steps_;
      ++blocks_;
      ready_ = std::min(held_, kBlockFrames);
      held_ -= ready_;
    }
    if (!inner_->render_next(frame)) return false;
    --ready_;
    return true;
  }
  void finish(int64_t total_frames) override {
    inner_->finish(total_frames);
    at_end_ = true;
  }
  void reset() override {
    inner_->reset();
    held_ = ready_ = 0;
    at_end_ = false;
    blocks_ = 0;
    last_steps_ = 0;
  }
  void set_cancel_flag(const std::atomic<bool>* flag) override { cancel_ = flag; }
  Size default_size(int w, int h) const override { return inner_->default_size(w, h); }
  void check_size(Size size) const override { inner_->check_size(size); }
  int frames_per_block() const override { return kBlockFrames; }
  int max_steps() const override { return kSteps; }
  void set_steps(int steps) override { steps_ = std::clamp(steps, 1, kSteps); }
  int last_block_steps() const override { return last_steps_; }
  bool prefers_worker() const override { return true; }

 private:
  void sleep_block() {
    const int block_ms = slow_blocks_ > 0 && blocks_ >= slow_blocks_ ? block_ms_ / 10 : block_ms_;
    const auto end = std::chrono::steady_clock::now() + std::chrono::milliseconds(block_ms * steps_ / kSteps);
    while (std::chrono::steady_clock::now() < end) {
      if (cancel_ && cancel_->load()) throw Cancelled();
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }

  std::unique_ptr<Backend> inner_;
  int block_ms_;
  int slow_blocks_;
  int steps_ = kSteps;
  int last_steps_ = 0;
  int64_t blocks_ = 0;  // blocks made in this stream
  int held_ = 0;   // frames whose audio is in, not yet released
  int ready_ = 0;  // frames of the released block not drawn yet
  bool at_end_ = false;
  const std::atomic<bool>* cancel_ = nullptr;
};

}  // namespace

std::unique_ptr<Backend> make_slow_backend(std::unique_ptr<Backend> inner, const EngineConfig& config) {
  return std::make_unique<SlowBackend>(std::move(inner), config.testing_block_delay_ms, config.testing_slow_blocks);
}

}  // namespace liveavatar
