// Internal interface between the Engine (timing, validation, tail handling) and a backend (the pictures).
// SPDX-License-Identifier: LGPL-2.1-or-later
#pragma once

#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "liveavatar/engine.h"

namespace liveavatar {

/// A packed RGB8 image owned by the engine.
struct RgbImage {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> data;  // stride = width * 3
};

/// Thread-safety: used by one Engine, never concurrently (the engine's worker and the caller take turns under a lock).
class Backend {
 public:
  virtual ~Backend() = default;
  /// New portrait and output size. Appends user-facing warnings (e.g. no face found) to *warnings.
  virtual void set_reference(const RgbImage& image, Size output, std::vector<std::string>* warnings) = 0;
  virtual void set_output_size(Size output) = 0;
  virtual FaceLayout face_layout() const = 0;
  /// Audio of `frames` whole frames (frames * samples_per_frame samples), in stream order.
  virtual void push_audio_frames(const float* samples, int frames) = 0;
  /// Renders the next frame whose audio has been pushed; false when none is pending.
  virtual bool render_next(Frame* frame) = 0;
  /// Passes over the next pending frame without drawing it (Engine::skip_to); false when none is pending. A backend
  /// that can do it cheaper than drawing overrides it.
  virtual bool skip_next() {
    Frame f;
    return render_next(&f);
  }
  /// End of stream: every frame < total_frames must become renderable (a block backend pads its last block).
  virtual void finish(int64_t total_frames) { (void)total_frames; }
  /// New stream, same reference.
  virtual void reset() = 0;
  /// The engine's cancel flag: a backend whose work comes in long steps checks it between them and throws Cancelled.
  virtual void set_cancel_flag(const std::atomic<bool>* flag) { (void)flag; }
  /// Output size for a reference of w x h when none is configured.
  virtual Size default_size(int reference_width, int reference_height) const {
    return default_output_size(reference_width, reference_height);
  }
  /// Throws Error, saying which sizes work, when the backend cannot make frames of `size`.
  virtual void check_size(Size size) const { (void)size; }
  /// Frames made at once: the engine feeds a worker this many frames of audio per unit of work.
  virtual int frames_per_block() const { return 1; }
  /// Warnings from making the backend (e.g. a model folder without its LoRA), for Engine::take_warnings().
  virtual std::vector<std::string> startup_warnings() const { return {}; }
  /// Denoising steps of a full block (1: the backend does not work in steps).
  virtual int max_steps() const { return 1; }
  /// Steps of the blocks started from now on, 1 .. max_steps() (Engine::set_denoising_steps).
  virtual void set_steps(int steps) { (void)steps; }
  /// Steps the last block was made with (0: none yet, or the backend has no steps).
  virtual int last_block_steps() const { return 0; }
  /// Whether "auto" runs this backend on a worker thread (long blocks) or inline (cheap frames, rendered when taken).
  virtual bool prefers_worker() const { return false; }
  /// The plan the backend runs (fixed at construction).
  virtual ExecutionPlan execution_plan() const { return {}; }
};

std::unique_ptr<Backend> make_puppet_backend(const EngineConfig& config);
/// Tests only: `inner` working in blocks of 12 frames on a worker, sleeping config.testing_block_delay_ms per block.
std::unique_ptr<Backend> make_slow_backend(std::unique_ptr<Backend> inner, const EngineConfig& config);
/// Tests only: `inner` failing on purpose at a frame, as config.testing_fault says (throws Error for a bad spec).
std::unique_ptr<Backend> make_fault_backend(std::unique_ptr<Backend> inner, const EngineConfig& config);

using BackendFactory = std::unique_ptr<Backend> (*)(const EngineConfig& config);
/// Adds a backend under `name` (replacing one of that name). Thread-safe.
void register_backend(const std::string& name, BackendFactory factory);

}  // namespace liveavatar
