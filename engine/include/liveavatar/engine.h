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
//   while (engine->pop_frame(&frame)) { ... }           // after finish() this waits for every last frame
//
// Generation worker: with worker = "thread" (the default for the neural backend) the model work (audio features,
// DiT blocks, VAE) runs on a thread owned by the Engine. push_audio() then only validates and enqueues; frames
// appear in a bounded queue as blocks finish. pop_frame() never waits while the stream is open (false: nothing
// ready yet); wait_frame() waits up to a timeout; after finish() both wait until the next frame or the end. An
// error on the worker is thrown (as the same Error) by the next push_audio() / push_silence() / finish() /
// pop_frame() / wait_frame(), and again until reset(). With worker = "inline" the same calls do the work in the
// caller's thread; both modes give the same frames.
//
// Timing contract: frame n shows the audio samples [n * spf, (n + 1) * spf) where spf = samples_per_frame()
// (640 at 16 kHz and 25 fps). After finish(), exactly ceil(samples / spf) frames have been produced: the last one
// covers the tail, none goes beyond it, and zero samples give zero frames.
//
// Thread-safety: an Engine serves one stream. Its methods must not be called concurrently (the caller serialises),
// except cancel(), set_denoising_steps(), latency() and stats(), which any thread may call at any time; distinct Engines are independent.
// Errors are thrown as liveavatar::Error whose what() tells the user what to do.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
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

/// Thrown by push_audio() / push_silence() / finish() / pop_frame() / wait_frame() after cancel(), until reset().
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

/// Pixel area the neural backend's output stays under when width/height are not set (upstream's 704*384 setting).
constexpr int64_t kDefaultMaxArea = 704 * 384;

/// The neural model's output size for a reference of w x h, as LiveAvatar chooses it: the reference's aspect, each
/// side padded up to a multiple of 64, the largest such size whose area is at most max_area (a reference already
/// under the area keeps its scale). The picture is then scaled to cover it and centre-cropped. Throws Error for
/// images below kMinReferenceSide or a max_area below 64 x 64.
Size model_output_size(int reference_width, int reference_height, int64_t max_area = kDefaultMaxArea);

/// How far Engine::create has got loading a model (backend "liveavatar"; the puppet loads nothing).
struct LoadProgress {
  std::string file;      // the file being read now ("" once everything is read)
  int files_done = 0;    // files read completely
  int files_total = 0;
  uint64_t bytes_done = 0;   // bytes of the weight files read so far
  uint64_t bytes_total = 0;  // bytes of all the weight files
};

struct EngineConfig {
  std::string backend = "puppet";  // "puppet" (CPU, no weights) or "liveavatar" (the neural model, needs model_dir)
  int width = 0;                   // output width, 0 = the backend's default for the reference (puppet:
  int height = 0;                  // default_output_size(), liveavatar: model_output_size()); liveavatar: x 64
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
  std::string precision = "fp32";    // fp32 | bf16 | fp8 (e4m3 weights + scale, bf16 activations): the DiT
  std::string device = "cpu";        // cpu | cuda
  int64_t max_area = 0;              // output area cap when width/height are 0; 0 = kDefaultMaxArea (704 x 384)
  uint64_t memory_budget = 0;        // bytes the model may use on its device, checked by the memory planner from
                                     // config.json before any weight file is read; 0 = what the device has
                                     // free (cpu: MemAvailable of /proc/meminfo)

  // Parallel plans, backend "liveavatar" only (docs/parallel.md). Ranks are threads of this process, each with its
  // own part of the weights, unless `rendezvous` is set: then ranks 1.. are liveavatar-worker processes (on this or
  // other hosts) that join rank 0, this engine, at that address.
  std::string parallel = "single";  // auto (the memory planner's choice) | single | step | stage
  std::string devices;              // one device per rank: "cpu:2" (two CPU ranks), "cuda:0,cuda:1"; "" = `device`
  std::string kv_precision = "auto";  // the KV caches' storage: auto = the DiT's activations (fp32 with fp32
                                      // weights, else bf16) | fp32 | bf16 | fp8 (e4m3, read back converted)
  std::string rendezvous;           // "" = every rank in this process; "host:port" where rank 0 hosts the c10d store
  int parallel_timeout_ms = 30000;  // longest wait for another rank; then the stream fails naming that rank

  // Generation worker (see the top of this file): "thread" = a worker thread does the model work, "inline" = the
  // caller's thread does, "auto" = thread for backends that work in blocks (liveavatar), inline for the puppet
  // (which renders each frame when it is taken, so a new picture shows from the very next frame).
  std::string worker = "auto";
  int max_queued_frames = 0;  // bound of the frame queue of the worker; 0 = two blocks, at least 25 frames

  // Called by Engine::create (on its thread) as it loads: at each file and, for the DiT, at each tensor. It may
  // throw Cancelled to stop the load; create() then throws Cancelled and keeps nothing it loaded.
  std::function<void(const LoadProgress&)> on_load_progress;

  // Tests only (lag handling without a model): > 0 makes backend "puppet" work like a slow block model, in blocks
  // of 12 frames on the worker, sleeping this long per block (cancellable). Not reachable from the element's
  // properties.
  int testing_block_delay_ms = 0;
  // Tests only: > 0 = only the first this many blocks of a stream take testing_block_delay_ms, later ones a tenth of
  // it (a model that falls behind, then catches up).
  int testing_slow_blocks = 0;
  // Tests only (fault injection): "error@N" / "oom@N" / "bad-alloc@N" make the backend throw, when asked for frame N
  // of a stream, a plain std::exception / a device out-of-memory error / std::bad_alloc. Empty: no fault. Not
  // reachable from the element's properties.
  std::string testing_fault;
};

/// What the engine is doing, for the element's latency, QoS and stats messages and for the bench.
struct EngineStats {
  bool threaded = false;        // a worker thread does the model work
  int frames_per_block = 1;     // frames the backend makes at once (12 for liveavatar, 1 for the puppet)
  int64_t frames_taken = 0;     // frames returned by pop_frame() / wait_frame() in this stream
  int64_t frames_queued = 0;    // made, waiting in the frame queue
  int64_t frames_pending = 0;   // audio of these frames is in, the frames are not made yet
  int64_t blocks_done = 0;      // blocks made in this stream
  int64_t frames_skipped = 0;   // frames skip_to() made unwanted: their audio dropped unmade, or made and discarded
  double ms_per_block = 0;      // processing time of one block: moving average over recent blocks (0: none yet)
  double ms_last_block = 0;     // processing time of the last block
  double ms_first_frame = 0;    // from the first audio of the stream to its first frame being ready (0: not yet)
  int steps_full = 1;           // denoising steps of a full-quality block (liveavatar: 4; backends without: 1)
  int steps = 1;                // steps the next block is made with (set_denoising_steps)
  int steps_last_block = 0;     // steps the last block was made with (0: none yet)
  int64_t blocks_degraded = 0;  // blocks made with fewer than steps_full steps in this stream
};

/// How the work is spread over devices (rank 0's view, fixed when the engine is created), for messages and logs.
struct DevicePlan {
  std::string device;  // "cpu", "cuda:1"
  std::string role;    // "single", "step 2", "stage 1/4 (layers 10-19)"
  uint64_t bytes = 0;  // what the memory planner counts for it (weights, caches, activations, slack)
  uint64_t free_bytes = 0;  // what it was planned against (0: not known)
};
struct ExecutionPlan {
  std::string parallel;       // "single", "step", "stage" ("" : the backend has no plan, e.g. the puppet)
  std::string precision;      // DiT weights
  std::string kv_precision;   // KV caches
  std::string rendezvous;     // "" = every rank in this process, else where the workers join
  std::vector<DevicePlan> devices;  // one per rank, rank 0 first
  std::string companions;     // where the VAE decoder and wav2vec2 run ("cuda:3"), beside the DiT (the planner's
                              // choice: a device without a rank, else the rank with the most room)
  std::string text_encoder;   // where umT5 encodes the prompt ("cpu" when no device has room for it)
  std::string summary;        // one line: "stage x2 on cpu, cpu: 1.2 GiB, 1.1 GiB (fp32, KV fp32)"
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
  /// Moves the next frame into *frame; false when none is ready. Never waits before finish(); after finish() it
  /// waits for the worker and returns false only when every frame of the stream has been taken.
  virtual bool pop_frame(Frame* frame) = 0;
  /// Like pop_frame(), but waits up to `timeout` for the next frame; false on time-out or at the end.
  virtual bool wait_frame(Frame* frame, std::chrono::milliseconds timeout) = 0;
  /// True after finish() once every frame has been taken.
  virtual bool done() const = 0;
  /// Ends the audio stream: the partial last frame (if any) becomes available to pop_frame().
  virtual void finish() = 0;
  /// Starts a new stream (frame index 0, fresh random state) keeping the reference and size.
  virtual void reset() = 0;

  virtual int samples_per_frame() const = 0;
  virtual int64_t samples_pushed() const = 0;
  /// Warnings since the last call (e.g. "no face found"), for the caller to show.
  virtual std::vector<std::string> take_warnings() = 0;

  /// Stops the work in progress at the next denoising step or block boundary; from then on push_audio(),
  /// push_silence(), finish(), pop_frame() and wait_frame() throw Cancelled until reset(), which clears it and
  /// makes the engine reusable (the conditioning of the current picture is kept). Any thread may call it.
  virtual void cancel() = 0;

  /// Frames before `index` are no longer wanted (a live caller showed something else for them): blocks of audio not
  /// started yet whose frames all lie before it are dropped without being made, frames made before it are
  /// discarded, and the next frame returned is `index` (or later). Frame indices stay those of the audio; the frame
  /// count after finish() is unchanged. A worker catches up at once instead of working through stale blocks.
  virtual void skip_to(int64_t index) = 0;

  /// Denoising steps of the blocks started from now on, 1 .. stats().steps_full; 0 = the full count. A live caller
  /// lowers it to catch up when the model falls behind (lag-policy=degrade) and raises it again once it keeps up.
  /// Backends that do not denoise in steps ignore it (except the tests' slow backend, whose blocks then take
  /// proportionally less time). Any thread may call it.
  virtual void set_denoising_steps(int steps) = 0;

  /// Delay from the audio of a frame arriving to that frame being ready: one block of audio to collect, plus the
  /// processing time of a block, plus the blocks of audio queued ahead of it. Any thread may call it.
  virtual std::chrono::nanoseconds latency() const = 0;
  virtual EngineStats stats() const = 0;
  /// How the backend spreads its work (the parallel plan and the bytes per device). Any thread may call it.
  virtual ExecutionPlan execution_plan() const = 0;
};

/// Names of the registered backends, for help texts.
std::vector<std::string> backend_names();

/// Registers the neural backend "liveavatar" when the engine was built with LibTorch; returns whether it is
/// available. Idempotent and thread-safe; call once before Engine::create (the GStreamer plugin does).
bool register_neural_backend();

}  // namespace liveavatar
