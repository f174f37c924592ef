// Engine: validation, audio framing and the exact-length tail, on top of a Backend run inline or on a worker.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include "liveavatar/engine.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <map>
#include <mutex>
#include <string>
#include <thread>

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

using Clock = std::chrono::steady_clock;

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// The Engine: validation, audio framing and the exact-length tail on the caller's side; the backend's work either
// inline or on a worker thread that takes one block of audio at a time and fills a bounded frame queue.
//
//   caller: push_audio -> whole frames -> audio_ ----> worker: backend push + render ----> frames_ -> pop_frame
//           finish ----------------------> finish_pending_ ----> backend finish + render -^
//
// Locks: mu_ guards the queues, counters and the error; backend_mu_ is held while the backend works (by the worker
// for one unit, by the caller for set_reference / set_output_size / face_layout). Never both in the other order:
// the worker takes backend_mu_ only with mu_ released.
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
    if (config.worker != "auto" && config.worker != "thread" && config.worker != "inline")
      throw Error("worker must be auto, thread or inline, got '" + config.worker + "'");
    if (config.max_area < 0)
      throw Error("max_area must be 0 (the model's 704x384 area) or positive, got " + std::to_string(config.max_area));
    if (config.max_queued_frames < 0)
      throw Error("max_queued_frames must be 0 (automatic) or positive, got " +
                  std::to_string(config.max_queued_frames));
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
    plan_ = backend_->execution_plan();
    if (!config.testing_fault.empty()) backend_ = make_fault_backend(std::move(backend_), config);
    if (config.testing_block_delay_ms < 0)
      throw Error("testing_block_delay_ms must be 0 or positive, got " + std::to_string(config.testing_block_delay_ms));
    if (config.testing_block_delay_ms > 0) backend_ = make_slow_backend(std::move(backend_), config);
    warnings_ = backend_->startup_warnings();
    if (requested_.width) backend_->check_size(requested_);
    backend_->set_cancel_flag(&cancel_);
    fpb_ = std::max(1, backend_->frames_per_block());
    steps_full_ = std::max(1, backend_->max_steps());
    threaded_ = config.worker == "thread" || (config.worker == "auto" && backend_->prefers_worker());
    capacity_ = config.max_queued_frames > 0 ? static_cast<size_t>(std::max(config.max_queued_frames, fpb_))
                                             : static_cast<size_t>(std::max(2 * fpb_, 25));
    pending_.reserve(spf_);
    if (threaded_) worker_ = std::thread([this] { worker_main(); });
  }

  ~EngineImpl() override {
    if (!worker_.joinable()) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      cancel_ = true;  // a block in progress ends at its next check
    }
    cv_work_.notify_all();
    worker_.join();
  }

  void set_reference(const ImageView& image) override {
    RgbImage rgb = to_rgb(image);
    Size out = requested_.width ? requested_ : backend_->default_size(rgb.width, rgb.height);
    {
      std::lock_guard<std::mutex> lock(backend_mu_);
      backend_->set_reference(rgb, out, &warnings_);
    }
    size_ = out;
    reference_width_ = rgb.width;
    reference_height_ = rgb.height;
    has_reference_ = true;
  }
  bool has_reference() const override { return has_reference_; }

  void set_output_size(Size size) override {
    check_size(size, "output size");
    if (size.width) backend_->check_size(size);
    requested_ = size;
    if (!has_reference_) return;
    Size out = size.width ? size : backend_->default_size(reference_width_, reference_height_);
    {
      std::lock_guard<std::mutex> lock(backend_mu_);
      backend_->set_output_size(out);
    }
    size_ = out;
  }
  Size output_size() const override { return has_reference_ ? size_ : requested_; }
  FaceLayout face_layout() const override {
    if (!has_reference_) return FaceLayout{};
    std::lock_guard<std::mutex> lock(backend_mu_);
    return backend_->face_layout();
  }

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
        submit(pending_.data(), 1);
        pending_.clear();
      }
    }
    const size_t whole = (count - i) / spf_;
    if (whole) {
      scratch_.assign(samples + i, samples + i + whole * spf_);
      sanitize(scratch_.data(), scratch_.size());
      submit(scratch_.data(), static_cast<int>(whole));
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
    if (!threaded_) return pop_inline(frame);
    std::unique_lock<std::mutex> lock(mu_);
    if (!finished_) return take_locked(frame);
    return wait_locked(lock, frame, nullptr);
  }

  bool wait_frame(Frame* frame, std::chrono::milliseconds timeout) override {
    if (!frame) throw Error("wait_frame: null frame");
    if (!threaded_) return pop_inline(frame);
    const auto deadline = Clock::now() + timeout;
    std::unique_lock<std::mutex> lock(mu_);
    return wait_locked(lock, frame, &deadline);
  }

  bool done() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return finished_ && next_index_ >= total_frames_;
  }

  void finish() override {
    if (finished_) return;
    throw_if_stopped();
    total_frames_ = (samples_ + spf_ - 1) / spf_;
    if (!pending_.empty()) {
      pending_.resize(spf_, 0.f);  // pad the tail with silence: one last frame covers it
      sanitize(pending_.data(), spf_);
      submit(pending_.data(), 1);
      pending_.clear();
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      finished_ = true;
      if (threaded_ && has_reference_) finish_pending_ = true;
    }
    if (!has_reference_) return;
    if (threaded_) {
      cv_work_.notify_all();
    } else {
      run_inline([&] { backend_->finish(total_frames_); });
    }
  }

  void cancel() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancel_ = true;
    }
    cv_work_.notify_all();
    cv_frames_.notify_all();
  }

  void reset() override {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cancel_ = true;  // the worker drops what it is doing at its next check
      cv_frames_.notify_all();
      cv_idle_.wait(lock, [&] { return !busy_; });
      audio_.clear();
      frames_.clear();
      finish_pending_ = false;
      error_ = nullptr;
    }
    {
      std::lock_guard<std::mutex> lock(backend_mu_);
      backend_->reset();
    }
    std::lock_guard<std::mutex> lock(mu_);
    pending_.clear();
    samples_ = 0;
    next_index_ = 0;
    total_frames_ = 0;
    finished_ = false;
    frames_submitted_ = 0;
    frames_made_ = 0;
    frames_given_ = 0;
    dropped_unmade_ = 0;
    remap_.clear();
    skip_target_ = 0;
    work_ms_ = 0;
    stats_ = EngineStats{};
    first_audio_ = Clock::time_point{};
    steps_req_ = 0;  // a new stream starts at full quality
    cancel_ = false;
  }

  int samples_per_frame() const override { return spf_; }
  int64_t samples_pushed() const override { return samples_; }
  std::vector<std::string> take_warnings() override {
    std::vector<std::string> w;
    w.swap(warnings_);
    return w;
  }

  void skip_to(int64_t index) override {
    if (!threaded_) {
      // Inline: the backend passes over the frames whose audio is in; later ones are passed over when taken.
      throw_if_stopped();
      if (index <= next_index_) return;
      std::lock_guard<std::mutex> backend_lock(backend_mu_);
      while (next_index_ < index && backend_->skip_next()) {
        std::lock_guard<std::mutex> lock(mu_);
        ++next_index_;
        ++frames_made_;
        ++stats_.frames_skipped;
      }
      std::lock_guard<std::mutex> lock(mu_);
      skip_target_ = std::max(skip_target_, index);
      return;
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (index <= next_index_) return;
    while (!frames_.empty() && frames_.front().index < index) {  // made, now unwanted
      frames_.pop_front();
      ++stats_.frames_skipped;
    }
    next_index_ = index;
    cv_work_.notify_one();  // room in the queue; stale audio to drop
  }

  void set_denoising_steps(int steps) override {
    if (steps < 0) throw Error("denoising steps must be 0 (the full count) or positive, got " + std::to_string(steps));
    steps_req_ = std::min(steps, steps_full_);
  }

  std::chrono::nanoseconds latency() const override {
    const EngineStats s = stats();
    const double frame_ns = 1e9 * config_.fps_d / config_.fps_n;
    // The frames pending include the block in progress (or next to start): the blocks queued behind it wait.
    const int64_t blocks_ahead = std::max<int64_t>(0, s.frames_pending - s.frames_per_block) / s.frames_per_block;
    const double ns = frame_ns * s.frames_per_block + s.ms_per_block * 1e6 * static_cast<double>(1 + blocks_ahead);
    return std::chrono::nanoseconds(static_cast<int64_t>(ns));
  }

  ExecutionPlan execution_plan() const override { return plan_; }

  EngineStats stats() const override {
    std::lock_guard<std::mutex> lock(mu_);
    EngineStats s = stats_;
    s.threaded = threaded_;
    s.frames_per_block = fpb_;
    s.frames_taken = next_index_;
    s.frames_queued = static_cast<int64_t>(frames_.size());
    s.frames_pending = std::max<int64_t>(0, frames_submitted_ - frames_made_ - dropped_unmade_);
    s.steps_full = steps_full_;
    const int req = steps_req_.load();
    s.steps = req > 0 ? req : steps_full_;
    return s;
  }

 private:
  void check_can_push() const {
    if (!has_reference_)
      throw Error("audio arrived before the reference image: set a portrait first (link the image pad)");
    if (finished_) throw Error("audio pushed after finish(): call reset() to start a new stream");
    throw_if_stopped();
  }

  // The worker's error (sticky until reset) or a cancellation.
  void throw_if_stopped() const {
    std::exception_ptr error;
    {
      std::lock_guard<std::mutex> lock(mu_);
      error = error_;
    }
    if (error) std::rethrow_exception(error);
    if (cancel_) throw Cancelled();
  }

  // Whole frames of sanitised audio for the backend.
  void submit(const float* samples, int frames) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (frames_submitted_ == 0) first_audio_ = Clock::now();
      frames_submitted_ += frames;
      if (threaded_) audio_.insert(audio_.end(), samples, samples + static_cast<size_t>(frames) * spf_);
    }
    if (threaded_) {
      cv_work_.notify_one();
      return;
    }
    run_inline([&] {
      apply_steps();
      backend_->push_audio_frames(samples, frames);
      note_steps(backend_->last_block_steps(), 0);
    });
  }

  // The requested step count, for the blocks the backend starts now (backend_mu_ held, or the caller's thread).
  void apply_steps() {
    const int req = steps_req_.load();
    backend_->set_steps(req > 0 ? req : steps_full_);
  }

  // The steps of the last block, and `blocks` more blocks made with them.
  void note_steps(int used, int64_t blocks) {
    std::lock_guard<std::mutex> lock(mu_);
    if (used > 0) stats_.steps_last_block = used;
    if (used > 0 && used < steps_full_) stats_.blocks_degraded += blocks;
  }

  // Inline mode: the backend's work in the caller's thread, timed like the worker's.
  template <typename Work>
  void run_inline(Work&& work) {
    const auto t0 = Clock::now();
    work();
    std::lock_guard<std::mutex> lock(mu_);
    work_ms_ += ms_since(t0);
  }

  bool pop_inline(Frame* frame) {
    throw_if_stopped();
    if (!has_reference_) return false;
    while (next_index_ < skip_target_) {  // skip_to() ahead of the audio that was in then
      if (!backend_->skip_next()) return false;
      std::lock_guard<std::mutex> lock(mu_);
      ++next_index_;
      ++frames_made_;
      ++stats_.frames_skipped;
    }
    if (finished_ && next_index_ >= total_frames_) return false;
    const auto t0 = Clock::now();
    if (!backend_->render_next(frame)) return false;
    if (frame->index != next_index_)
      throw Error("internal error: backend produced frame " + std::to_string(frame->index) + ", expected " +
                  std::to_string(next_index_));
    std::lock_guard<std::mutex> lock(mu_);
    work_ms_ += ms_since(t0);
    ++frames_made_;
    account_frames(1);
    ++next_index_;
    return true;
  }

  // Threaded: the next frame if one is queued (mu_ held).
  // Frames made before a worker error still come out; the error comes next.
  bool take_locked(Frame* frame) {
    if (cancel_) throw Cancelled();
    while (!frames_.empty()) {
      Frame f = std::move(frames_.front());
      frames_.pop_front();
      cv_work_.notify_one();  // room in the queue
      if (finished_ && f.index >= total_frames_) continue;  // the padding of the last block
      if (f.index < next_index_) {                            // made after skip_to() said it is not wanted
        ++stats_.frames_skipped;
        continue;
      }
      if (f.index != next_index_)
        throw Error("internal error: backend produced frame " + std::to_string(f.index) + ", expected " +
                    std::to_string(next_index_));
      *frame = std::move(f);
      ++next_index_;
      return true;
    }
    if (error_) std::rethrow_exception(error_);
    return false;
  }

  // Threaded: waits for the next frame, the end of the stream (after finish), an error, a cancel or the deadline.
  bool wait_locked(std::unique_lock<std::mutex>& lock, Frame* frame, const Clock::time_point* deadline) {
    for (;;) {
      if (take_locked(frame)) return true;
      if (finished_ && next_index_ >= total_frames_) return false;
      if (finished_ && !busy_ && !finish_pending_ && audio_.size() < static_cast<size_t>(spf_))
        throw Error("internal error: the backend ended the stream after " + std::to_string(next_index_) +
                    " frames of " + std::to_string(total_frames_));
      if (!deadline) {
        cv_frames_.wait(lock);
      } else if (cv_frames_.wait_until(lock, *deadline) == std::cv_status::timeout) {
        return take_locked(frame);
      }
    }
  }

  // Per-block processing time from the work done since the last frames appeared (mu_ held).
  void account_frames(int64_t made) {
    if (made <= 0) return;
    const double per_block = work_ms_ / static_cast<double>(made) * fpb_;
    work_ms_ = 0;
    stats_.ms_last_block = per_block;
    stats_.ms_per_block = stats_.ms_per_block > 0 ? 0.8 * stats_.ms_per_block + 0.2 * per_block : per_block;
    stats_.blocks_done = frames_made_ / fpb_;
    if (stats_.ms_first_frame == 0 && first_audio_ != Clock::time_point{})
      stats_.ms_first_frame = ms_since(first_audio_);
  }

  bool runnable() const {
    return !error_ && !cancel_ && frames_.size() < capacity_ &&
           (audio_.size() >= static_cast<size_t>(spf_) || finish_pending_);
  }

  void worker_main() {
    std::unique_lock<std::mutex> lock(mu_);
    std::vector<float> unit;
    for (;;) {
      cv_work_.wait(lock, [&] { return stop_ || runnable(); });
      if (stop_) return;
      drop_stale_audio();
      if (!runnable()) continue;
      // One unit: up to a block of audio, or the end of the stream once all audio is in.
      const int frames = static_cast<int>(std::min<size_t>(audio_.size() / spf_, static_cast<size_t>(fpb_)));
      const bool at_end = frames == 0;
      unit.assign(audio_.begin(), audio_.begin() + static_cast<size_t>(frames) * spf_);
      audio_.erase(audio_.begin(), audio_.begin() + static_cast<size_t>(frames) * spf_);
      if (at_end) finish_pending_ = false;
      frames_given_ += frames;
      const int64_t total = total_frames_ - dropped_unmade_;  // the backend counts only the frames it was given
      busy_ = true;
      lock.unlock();

      std::vector<Frame> made;
      int steps_used = 0;
      std::exception_ptr error;
      const auto t0 = Clock::now();
      try {
        std::lock_guard<std::mutex> backend_lock(backend_mu_);
        apply_steps();
        if (frames) backend_->push_audio_frames(unit.data(), frames);
        if (at_end) backend_->finish(total);
        Frame f;
        while (backend_->render_next(&f)) made.push_back(std::move(f));
        steps_used = backend_->last_block_steps();
      } catch (const Cancelled&) {
        // cancel() or reset(): the caller sees Cancelled through cancel_.
      } catch (...) {
        error = std::current_exception();
      }
      const double ms = ms_since(t0);

      lock.lock();
      busy_ = false;
      if (!cancel_) {
        if (error) error_ = error;
        work_ms_ += ms;
        frames_made_ += static_cast<int64_t>(made.size());
        account_frames(static_cast<int64_t>(made.size()));
        if (steps_used > 0) stats_.steps_last_block = steps_used;
        if (steps_used > 0 && steps_used < steps_full_)
          stats_.blocks_degraded += (static_cast<int64_t>(made.size()) + fpb_ - 1) / fpb_;
        for (auto& f : made) {
          f.index = stream_index(f.index);
          frames_.push_back(std::move(f));
        }
      }
      cv_frames_.notify_all();
      cv_idle_.notify_all();
    }
  }

  // Whole blocks of queued audio whose frames all lie before next_index_ (skip_to) are dropped unmade; the backend's
  // frame numbers then run behind the stream's, which remap_ records (mu_ held).
  void drop_stale_audio() {
    int64_t dropped = 0;
    while (audio_.size() >= static_cast<size_t>(fpb_) * spf_ && frames_given_ + fpb_ <= next_index_) {
      audio_.erase(audio_.begin(), audio_.begin() + static_cast<size_t>(fpb_) * spf_);
      frames_given_ += fpb_;
      dropped += fpb_;
    }
    if (!dropped) return;
    dropped_unmade_ += dropped;
    stats_.frames_skipped += dropped;
    // Backend frames from the next one it is given on are `dropped_unmade_` behind the stream.
    const int64_t backend_next = frames_given_ - dropped_unmade_;
    if (!remap_.empty() && remap_.back().first == backend_next)
      remap_.back().second = dropped_unmade_;
    else
      remap_.emplace_back(backend_next, dropped_unmade_);
  }

  // The stream's index of the backend's frame `b` (mu_ held; frames come in order).
  int64_t stream_index(int64_t b) {
    while (remap_.size() > 1 && remap_[1].first <= b) remap_.pop_front();
    return !remap_.empty() && remap_.front().first <= b ? b + remap_.front().second : b;
  }

  // NaN / Inf would poison the smoothing state for the rest of the stream; clip like a DAC would.
  static void sanitize(float* s, size_t n) {
    for (size_t k = 0; k < n; ++k) {
      if (!std::isfinite(s[k])) s[k] = 0.f;
      s[k] = std::clamp(s[k], -1.f, 1.f);
    }
  }

  EngineConfig config_;
  ExecutionPlan plan_;  // the backend's, fixed at creation
  std::unique_ptr<Backend> backend_;
  mutable std::mutex backend_mu_;
  int spf_ = 640;
  int fpb_ = 1;
  int steps_full_ = 1;
  std::atomic<int> steps_req_{0};  // set_denoising_steps (0: full), read when a block starts
  bool threaded_ = false;
  size_t capacity_ = 25;
  Size requested_;
  Size size_;
  int reference_width_ = 0, reference_height_ = 0;
  bool has_reference_ = false;
  std::vector<float> pending_;  // samples of the incomplete frame
  std::vector<float> scratch_;
  int64_t samples_ = 0;
  std::vector<std::string> warnings_;
  std::atomic<bool> cancel_{false};

  // Shared with the worker, under mu_.
  mutable std::mutex mu_;
  std::condition_variable cv_work_;    // the worker: audio, finish, room in the queue, cancel, stop
  std::condition_variable cv_frames_;  // the caller: a frame, an error, the end
  std::condition_variable cv_idle_;    // reset(): the worker has left the backend
  std::vector<float> audio_;           // whole frames of audio not yet given to the backend
  std::deque<Frame> frames_;           // made, not yet taken
  bool finish_pending_ = false;
  bool busy_ = false;
  bool stop_ = false;
  std::exception_ptr error_;
  int64_t next_index_ = 0;
  int64_t total_frames_ = 0;
  bool finished_ = false;
  int64_t frames_submitted_ = 0;
  int64_t frames_made_ = 0;
  int64_t frames_given_ = 0;     // frames of audio given to the backend or dropped unmade, in stream order
  int64_t dropped_unmade_ = 0;   // frames whose audio skip_to() dropped before the backend saw it
  std::deque<std::pair<int64_t, int64_t>> remap_;  // (first backend frame, offset to the stream's index)
  int64_t skip_target_ = 0;      // inline: skip_to() index not reached yet
  double work_ms_ = 0;  // backend time since frames last appeared
  EngineStats stats_;
  Clock::time_point first_audio_{};
  std::thread worker_;
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

Size model_output_size(int w, int h, int64_t max_area) {
  if (w < kMinReferenceSide || h < kMinReferenceSide)
    throw Error("reference image " + size_text(w, h) + " is too small: at least " +
                std::to_string(kMinReferenceSide) + " pixels per side");
  constexpr int64_t kStep = 64;  // VAE x8, patch x2, FramePack 4x bucket x4
  if (max_area < kStep * kStep)
    throw Error("max-area " + std::to_string(max_area) + " is below the smallest output of 64x64 pixels");
  const double height = h, width = w, area = static_cast<double>(max_area);
  auto pad = [](int64_t side) { return (side + kStep - 1) / kStep * kStep; };
  // Scales from the one that fills the area unpadded down to the one that fills it with the most padding (the
  // bounds and the 100-step descent are upstream's get_size_less_than_area, including its quadratic's 2ac term).
  double min_scale = 0.1, max_scale = 1.0;
  if (height * width > area) {
    const double d = kStep - 1, a = height * width, b = d * (height + width), c = d * d - area;
    min_scale = (-b + std::sqrt(b * b - 2 * a * c)) / (2 * a);
    max_scale = std::sqrt(area / (height * width));
  }
  for (int i = 0; i < 100; ++i) {
    const double scale = max_scale - (max_scale - min_scale) * i / 100;
    const int64_t ph = pad(static_cast<int64_t>(height * scale)), pw = pad(static_cast<int64_t>(width * scale));
    if (ph * pw <= max_area && ph >= kStep && pw >= kStep) return {static_cast<int>(pw), static_cast<int>(ph)};
  }
  // Extreme aspects: the aspect kept as well as whole 64-pixel steps allow.
  const double aspect = width / height;
  int64_t tw = static_cast<int64_t>(std::sqrt(area * aspect) / kStep) * kStep;
  int64_t th = static_cast<int64_t>(std::sqrt(area / aspect) / kStep) * kStep;
  if (tw >= w || th >= h) {
    tw = w / kStep * kStep;
    th = h / kStep * kStep;
  }
  tw = std::max(tw, kStep);
  th = std::max(th, kStep);
  while (tw * th > max_area && (tw > kStep || th > kStep)) (tw >= th ? tw : th) -= kStep;
  return {static_cast<int>(tw), static_cast<int>(th)};
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
