// gst-liveavatar engine: one portrait + a stream of speech -> frames of that person talking.
// SPDX-License-Identifier: LGPL-2.1-or-later
//
// A small streaming API with no GStreamer inside:
//
//   auto engine = liveavatar::Engine::create(config);   // loads the backend
//   engine->set_reference(image);                       // once; a later call replaces it
//   engine->push_audio(samples, n);                     // any chunk size, mono float at config.sample_rate
//   while (engine->pop_frame(&frame)) { ... }           // frames in order, frame.index = 0, 1, 2, ...
//   engine->finish();                                   // end of audio: flushes the tail
//   while (engine->pop_frame(&frame)) { ... }
//
// Timing contract: frame n shows the audio samples [n * spf, (n + 1) * spf) where spf = samples_per_frame()
// (640 at 16 kHz and 25 fps). After finish(), exactly ceil(samples / spf) frames have been produced: the last one
// covers the tail, none goes beyond it, and zero samples give zero frames.
//
// Thread-safety: an Engine serves one stream. Its methods must not be called concurrently (the caller serialises);
// distinct Engines are independent. Errors are thrown as liveavatar::Error whose what() tells the user what to do.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace liveavatar {

/// Everything the engine rejects: bad configuration, unusable image, misuse of the API.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Thrown by push_audio() / push_silence() / finish() when cancel() stopped them between two blocks.
class Cancelled : public Error {
 public:
  Cancelled() : Error("cancelled") {}
};

enum class PixelFormat { kRGB8, kRGBA8, kGray8 };

/// A borrowed image; the engine copies what it needs before set_reference() returns.
struct ImageView {
  const uint8_t* data = nullptr;
  int width = 0;
  int height = 0;
  int stride = 0;  // bytes per row
  PixelFormat format = PixelFormat::kRGB8;
};

struct Rect {
  int x = 0, y = 0, width = 0, height = 0;
  bool empty() const { return width <= 0 || height <= 0; }
};

struct Size {
  int width = 0;
  int height = 0;
};

/// Smallest reference side the engine accepts.
constexpr int kMinReferenceSide = 64;
/// Longest output side chosen by default_output_size(); larger references are scaled down.
constexpr int kMaxDefaultSide = 1024;

/// Output size used when the config leaves width/height at 0: the reference size, scaled down so the longest side
/// is at most kMaxDefaultSide, rounded down to multiples of 16. Throws Error for images below kMinReferenceSide.
Size default_output_size(int reference_width, int reference_height);

struct EngineConfig {
  std::string backend = "puppet";  // "puppet" (CPU, no weights) or "liveavatar" (the neural model, needs model_dir)
  int width = 0;                   // output width, 0 = default_output_size() of the reference
  int height = 0;                  // output height, 0 = default_output_size() of the reference
  uint64_t seed = 0;               // same seed + same input = same frames
  int fps_n = 25;                  // output frame rate; sample_rate * fps_d / fps_n must be an integer
  int fps_d = 1;
  int sample_rate = 16000;  // mono float samples
  Rect mouth_box;           // in reference pixels; empty = found by the face detector
  std::string cascade_dir;  // OpenCV Haar cascades; empty = $LIVEAVATAR_CASCADE_DIR or the built-in path

  // Backend "liveavatar" only:
  std::string model_dir;             // folder holding Wan2.2-S2V-14B/ (and LiveAvatar/), or Wan2.2-S2V-14B itself
  std::string lora;                  // LiveAvatar LoRA; empty = <model_dir>/LiveAvatar/liveavatar.safetensors if there
  std::string prompt;                // text prompt (umT5), encoded once and cached
  std::string precision = "fp32";    // fp32 | bf16: dtype of the DiT
  std::string device = "cpu";        // cpu | cuda
};

/// Where the backend found (or assumed) the face, in output pixels.
struct FaceLayout {
  Rect face, left_eye, right_eye, mouth;
  bool detected = false;  // false: no face found, a centred default layout is used
};

struct Frame {
  int64_t index = 0;  // covers audio samples [index * spf, (index + 1) * spf)
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;  // packed RGB8, stride = width * 3
  float mouth_open = 0.f;    // 0 closed .. 1 wide open: what the backend rendered (diagnostics, tests)
  float blink = 0.f;         // 0 eyes open .. 1 closed
};

class Engine {
 public:
  /// Creates the backend named by config.backend. Throws Error for an unknown backend or invalid config.
  static std::unique_ptr<Engine> create(const EngineConfig& config);
  virtual ~Engine() = default;

  /// Sets or replaces the portrait. Throws Error if it is smaller than kMinReferenceSide on a side.
  virtual void set_reference(const ImageView& image) = 0;
  virtual bool has_reference() const = 0;
  /// Changes the output size (0 x 0 = default for the reference); takes effect from the next frame.
  virtual void set_output_size(Size size) = 0;
  /// Current output size; {0, 0} until a reference is set and no size was configured.
  virtual Size output_size() const = 0;
  virtual FaceLayout face_layout() const = 0;

  /// Appends mono samples. Needs a reference first (throws Error otherwise) and not after finish().
  virtual void push_audio(const float* samples, size_t count) = 0;
  /// Appends `count` samples of silence: a live caller uses it when audio is late, so the avatar idles.
  virtual void push_silence(size_t count) = 0;
  /// Moves the next frame into *frame; false when none is ready.
  virtual bool pop_frame(Frame* frame) = 0;
  /// Ends the audio stream: the partial last frame (if any) becomes available to pop_frame().
  virtual void finish() = 0;
  /// Starts a new stream (frame index 0, fresh random state) keeping the reference and size.
  virtual void reset() = 0;

  virtual int samples_per_frame() const = 0;
  virtual int64_t samples_pushed() const = 0;
  /// Warnings since the last call (e.g. "no face found"), for the caller to show.
  virtual std::vector<std::string> take_warnings() = 0;

  /// Asks a running push_audio() / push_silence() / finish() to stop at the next block boundary (it then throws
  /// Cancelled). The only method that may be called from another thread. reset() clears the request.
  virtual void cancel() = 0;
};

/// Names of the registered backends, for help texts.
std::vector<std::string> backend_names();

/// Registers the neural backend "liveavatar" when the engine was built with LibTorch; returns whether it is
/// available. Idempotent and thread-safe; call once before Engine::create (the GStreamer plugin does).
bool register_neural_backend();

}  // namespace liveavatar
