// Tests only: a backend that fails on purpose (fault injection, tests/hardening). It draws with another backend and
// throws when asked for frame N of a stream, the way a model fails mid-block: "error@N" throws what a LibTorch op
// throws on a bug (a std::exception that is not liveavatar::Error), "oom@N" what a device allocation failure throws
// (c10's "CUDA out of memory" text), "bad-alloc@N" a host allocation failure (std::bad_alloc).
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <new>
#include <stdexcept>
#include <string>

#include "../backend.h"

namespace liveavatar {

namespace {

enum class FaultKind { kError, kDeviceOom, kBadAlloc };

class FaultBackend final : public Backend {
 public:
  FaultBackend(std::unique_ptr<Backend> inner, FaultKind kind, int64_t at) : inner_(std::move(inner)), kind_(kind), at_(at) {}

  void set_reference(const RgbImage& image, Size output, std::vector<std::string>* warnings) override {
    inner_->set_reference(image, output, warnings);
  }
  void set_output_size(Size output) override { inner_->set_output_size(output); }
  FaceLayout face_layout() const override { return inner_->face_layout(); }
  void push_audio_frames(const float* samples, int frames) override { inner_->push_audio_frames(samples, frames); }
  bool render_next(Frame* frame) override {
    if (made_ == at_) fail();
    if (!inner_->render_next(frame)) return false;
    ++made_;
    return true;
  }
  void finish(int64_t total_frames) override { inner_->finish(total_frames); }
  void reset() override {
    inner_->reset();
    made_ = 0;
  }
  void set_cancel_flag(const std::atomic<bool>* flag) override { inner_->set_cancel_flag(flag); }
  Size default_size(int w, int h) const override { return inner_->default_size(w, h); }
  void check_size(Size size) const override { inner_->check_size(size); }
  int frames_per_block() const override { return inner_->frames_per_block(); }
  bool prefers_worker() const override { return inner_->prefers_worker(); }

 private:
  [[noreturn]] void fail() const {
    const std::string where = " (injected fault at frame " + std::to_string(at_) + ")";
    switch (kind_) {
      case FaultKind::kDeviceOom:
        throw std::runtime_error("CUDA out of memory. Tried to allocate 2.00 GiB" + where);
      case FaultKind::kBadAlloc:
        throw std::bad_alloc();
      case FaultKind::kError:
        break;
    }
    throw std::runtime_error("the backend failed in the middle of a block" + where);
  }

  std::unique_ptr<Backend> inner_;
  FaultKind kind_;
  int64_t at_;
  int64_t made_ = 0;  // frames made in this stream
};

}  // namespace

std::unique_ptr<Backend> make_fault_backend(std::unique_ptr<Backend> inner, const EngineConfig& config) {
  const std::string& spec = config.testing_fault;
  const auto at = spec.find('@');
  const std::string kind = spec.substr(0, at);
  int64_t frame = -1;
  try {
    size_t used = 0;
    if (at != std::string::npos) frame = std::stoll(spec.substr(at + 1), &used);
    if (at == std::string::npos || used != spec.size() - at - 1 || frame < 0) frame = -1;
  } catch (const std::exception&) {
    frame = -1;
  }
  const FaultKind k = kind == "error" ? FaultKind::kError : kind == "oom" ? FaultKind::kDeviceOom : FaultKind::kBadAlloc;
  if (frame < 0 || (kind != "error" && kind != "oom" && kind != "bad-alloc"))
    throw Error("testing_fault must be error@N, oom@N or bad-alloc@N (N a frame index), got '" + spec + "'");
  return std::make_unique<FaultBackend>(std::move(inner), k, frame);
}

}  // namespace liveavatar
