// SPDX-License-Identifier: LGPL-2.1-or-later
/**
 * SECTION:element-liveavatar
 *
 * Turns one portrait (the `image` pad) and a stream of speech (the `audio` pad) into raw video of that person
 * talking, at 25 frames per second.
 *
 * - `image`: any raw video; a still picture (one buffer then EOS, or imagefreeze) is kept as the reference, a later
 *   buffer with different content replaces it from the frame at its running time on.
 * - `audio`: F32LE mono 16 kHz (put audioconvert ! audioresample in front).
 * - `src`: RGB or I420 at `width`x`height` (default: from the portrait, multiples of 16), 25/1.
 *
 * Frame n covers the audio [n/25 s, (n+1)/25 s) of the audio segment and is stamped segment start + n/25 s. With
 * non-live input the element runs as fast as it can and the video is exactly as long as the audio. With live input
 * frames follow the clock: the element reports its real latency (puppet: one frame, 40 ms; backend=liveavatar: a
 * block of audio, 480 ms, plus the measured processing of a block, plus with lag-policy=wait the blocks queued) and
 * posts a LATENCY message when that figure changes; when audio is late or missing it keeps the avatar idling (mouth
 * closed, blinking, breathing) instead of stalling; audio that arrives after its frame was shown is dropped. When
 * the model cannot make a frame by its time, `lag-policy` decides: wait for it, repeat the last frame, let the
 * puppet draw it, or run fewer denoising steps until the model keeps up. Add latency for slow sources with the
 * aggregator's `latency` property. With backend=liveavatar the model loads on a worker (READY->PAUSED does not wait;
 * PROGRESS messages "load" report files, bytes and percent). Every `stats-interval` ms an element message
 * "liveavatar-stats" reports speaking (Silero VAD), fps, latency and queue depths. See docs/element.md.
 *
 * Seeks (flushing, in PAUSED, segment seeks) go to the audio branch; an image branch that cannot seek keeps its
 * picture. The duration is the audio's.
 *
 * ## Example launch line
 * |[
 * gst-launch-1.0 filesrc location=portrait.png ! pngdec ! videoconvert ! la.image \
 *   filesrc location=speech.wav ! wavparse ! audioconvert ! audioresample ! la.audio \
 *   liveavatar name=la ! videoconvert ! x264enc ! mp4mux ! filesink location=talk.mp4
 * ]|
 */
#include "gstliveavatar.h"

#include <gst/audio/audio.h>
#include <gst/video/video.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include "liveavatar/engine.h"
#include "liveavatar/vad.h"

GST_DEBUG_CATEGORY_STATIC(gst_live_avatar_debug);
#define GST_CAT_DEFAULT gst_live_avatar_debug

// ---------------------------------------------------------------------------------------------------------------
// Pad templates
#define IMAGE_FORMATS \
  "{ RGB, BGR, RGBA, BGRA, ARGB, ABGR, RGBx, BGRx, xRGB, xBGR, GRAY8, I420, YV12, NV12, NV21, Y444, Y42B, YUY2, UYVY }"

static GstStaticPadTemplate image_template = GST_STATIC_PAD_TEMPLATE(
    "image", GST_PAD_SINK, GST_PAD_ALWAYS, GST_STATIC_CAPS(GST_VIDEO_CAPS_MAKE(IMAGE_FORMATS)));

static GstStaticPadTemplate audio_template =
    GST_STATIC_PAD_TEMPLATE("audio", GST_PAD_SINK, GST_PAD_ALWAYS,
                            GST_STATIC_CAPS("audio/x-raw, format = (string) F32LE, rate = (int) 16000, "
                                            "channels = (int) 1, layout = (string) interleaved"));

static GstStaticPadTemplate src_template =
    GST_STATIC_PAD_TEMPLATE("src", GST_PAD_SRC, GST_PAD_ALWAYS,
                            GST_STATIC_CAPS("video/x-raw, format = (string) { RGB, I420 }, "
                                            "width = (int) [ 64, 8192 ], height = (int) [ 64, 8192 ], "
                                            "framerate = (fraction) 25/1, pixel-aspect-ratio = (fraction) 1/1"));

// ---------------------------------------------------------------------------------------------------------------
// Type
G_DEFINE_TYPE(GstLiveAvatar, gst_live_avatar, GST_TYPE_AGGREGATOR)
GST_ELEMENT_REGISTER_DEFINE(liveavatar, "liveavatar", GST_RANK_NONE, GST_TYPE_LIVE_AVATAR)

enum {
  PROP_0,
  PROP_BACKEND,
  PROP_WIDTH,
  PROP_HEIGHT,
  PROP_SEED,
  PROP_MOUTH_BOX,
  PROP_MODEL_DIR,
  PROP_LORA,
  PROP_PROMPT,
  PROP_PRECISION,
  PROP_MAX_AREA,
  PROP_LAG_POLICY,
  PROP_PARALLEL,
  PROP_DEVICES,
  PROP_KV_PRECISION,
  PROP_RENDEZVOUS,
  PROP_PARALLEL_TIMEOUT,
  PROP_STATS_INTERVAL,
  PROP_VAD_MODEL,
};

enum GstLiveAvatarBackend { GST_LIVE_AVATAR_BACKEND_PUPPET = 0, GST_LIVE_AVATAR_BACKEND_LIVEAVATAR = 1 };
enum GstLiveAvatarPrecision {
  GST_LIVE_AVATAR_PRECISION_FP32 = 0,
  GST_LIVE_AVATAR_PRECISION_BF16 = 1,
  GST_LIVE_AVATAR_PRECISION_FP8 = 2,
};
enum GstLiveAvatarParallel {
  GST_LIVE_AVATAR_PARALLEL_AUTO = 0,
  GST_LIVE_AVATAR_PARALLEL_SINGLE = 1,
  GST_LIVE_AVATAR_PARALLEL_STEP = 2,
  GST_LIVE_AVATAR_PARALLEL_STAGE = 3,
};
enum GstLiveAvatarKvPrecision {
  GST_LIVE_AVATAR_KV_PRECISION_AUTO = 0,
  GST_LIVE_AVATAR_KV_PRECISION_FP32 = 1,
  GST_LIVE_AVATAR_KV_PRECISION_BF16 = 2,
  GST_LIVE_AVATAR_KV_PRECISION_FP8 = 3,
};
enum GstLiveAvatarLagPolicy {
  GST_LIVE_AVATAR_LAG_POLICY_WAIT = 0,
  GST_LIVE_AVATAR_LAG_POLICY_DROP = 1,
  GST_LIVE_AVATAR_LAG_POLICY_PUPPET = 2,
  GST_LIVE_AVATAR_LAG_POLICY_DEGRADE = 3,
};

#define DEFAULT_BACKEND GST_LIVE_AVATAR_BACKEND_PUPPET
#define DEFAULT_WIDTH 0
#define DEFAULT_HEIGHT 0
#define DEFAULT_SEED 0
#define DEFAULT_MOUTH_BOX ""
#define DEFAULT_MODEL_DIR ""
#define DEFAULT_LORA ""
#define DEFAULT_PROMPT "A person is talking to the camera."
#define DEFAULT_PRECISION GST_LIVE_AVATAR_PRECISION_FP32
#define DEFAULT_MAX_AREA static_cast<guint>(liveavatar::kDefaultMaxArea)
#define DEFAULT_LAG_POLICY GST_LIVE_AVATAR_LAG_POLICY_WAIT
#define DEFAULT_PARALLEL GST_LIVE_AVATAR_PARALLEL_SINGLE
#define DEFAULT_DEVICES "cpu"
#define DEFAULT_KV_PRECISION GST_LIVE_AVATAR_KV_PRECISION_AUTO
#define DEFAULT_RENDEZVOUS ""
#define DEFAULT_PARALLEL_TIMEOUT 30000
#define DEFAULT_STATS_INTERVAL 1000
#define DEFAULT_VAD_MODEL ""

static constexpr int kFpsN = 25;
static constexpr int kFpsD = 1;
static constexpr int kRate = 16000;
static constexpr int kMaxImageSide = 4096;  // larger portraits are scaled down on arrival
static const GstClockTime kFrameDuration = GST_SECOND * kFpsD / kFpsN;
// Live, policy wait: a late frame is waited for in slices this long, so audio arriving meanwhile is not held up.
static constexpr std::chrono::milliseconds kWaitSlice{10};
// Live, policy wait: audio the model has not turned into frames yet is bounded; beyond it the element stops taking
// audio (the audio pad's queue then holds it back upstream).
static constexpr gint64 kMaxPendingFrames = 25 * 30;

GType gst_live_avatar_backend_get_type(void) {
  static GType type = 0;
  static const GEnumValue values[] = {
      {GST_LIVE_AVATAR_BACKEND_PUPPET, "Puppet: animates the portrait on the CPU, no model weights", "puppet"},
      {GST_LIVE_AVATAR_BACKEND_LIVEAVATAR, "LiveAvatar: the 14B streaming diffusion model (needs model-dir)",
       "liveavatar"},
      {0, nullptr, nullptr}};
  if (g_once_init_enter(&type)) {
    GType t = g_enum_register_static("GstLiveAvatarBackend", values);
    g_once_init_leave(&type, t);
  }
  return type;
}

#define GST_TYPE_LIVE_AVATAR_PRECISION (gst_live_avatar_precision_get_type())
static GType gst_live_avatar_precision_get_type(void) {
  static GType type = 0;
  static const GEnumValue values[] = {{GST_LIVE_AVATAR_PRECISION_FP32, "32-bit float", "fp32"},
                                      {GST_LIVE_AVATAR_PRECISION_BF16, "bfloat16 DiT", "bf16"},
                                      {GST_LIVE_AVATAR_PRECISION_FP8,
                                       "float8 e4m3 DiT linear weights with a scale, bfloat16 activations", "fp8"},
                                      {0, nullptr, nullptr}};
  if (g_once_init_enter(&type)) {
    GType t = g_enum_register_static("GstLiveAvatarPrecision", values);
    g_once_init_leave(&type, t);
  }
  return type;
}

#define GST_TYPE_LIVE_AVATAR_LAG_POLICY (gst_live_avatar_lag_policy_get_type())
static GType gst_live_avatar_lag_policy_get_type(void) {
  static GType type = 0;
  static const GEnumValue values[] = {
      {GST_LIVE_AVATAR_LAG_POLICY_WAIT, "Wait for every model frame: the latency grows (reported)", "wait"},
      {GST_LIVE_AVATAR_LAG_POLICY_DROP,
       "Skip stale blocks; a frame not ready in time repeats the last frame shown", "drop"},
      {GST_LIVE_AVATAR_LAG_POLICY_PUPPET,
       "Skip stale blocks; a frame not ready in time is drawn by the puppet from the same portrait and audio",
       "puppet"},
      {GST_LIVE_AVATAR_LAG_POLICY_DEGRADE,
       "Fewer denoising steps for the next blocks while the model falls behind, back to the full count once it "
       "keeps up; a frame still not ready in time repeats the last frame shown",
       "degrade"},
      {0, nullptr, nullptr}};
  if (g_once_init_enter(&type)) {
    GType t = g_enum_register_static("GstLiveAvatarLagPolicy", values);
    g_once_init_leave(&type, t);
  }
  return type;
}

#define GST_TYPE_LIVE_AVATAR_PARALLEL (gst_live_avatar_parallel_get_type())
static GType gst_live_avatar_parallel_get_type(void) {
  static GType type = 0;
  static const GEnumValue values[] = {
      {GST_LIVE_AVATAR_PARALLEL_AUTO, "The memory planner's choice: the fastest plan that fits the devices", "auto"},
      {GST_LIVE_AVATAR_PARALLEL_SINGLE, "One device holds everything", "single"},
      {GST_LIVE_AVATAR_PARALLEL_STEP,
       "One rank per denoising step (4), each with the whole DiT (LiveAvatar's TPP)", "step"},
      {GST_LIVE_AVATAR_PARALLEL_STAGE,
       "Layer pipeline: rank k holds layers [kL/N, (k+1)L/N) and their KV caches (fits 4x24 GB)", "stage"},
      {0, nullptr, nullptr}};
  if (g_once_init_enter(&type)) {
    GType t = g_enum_register_static("GstLiveAvatarParallel", values);
    g_once_init_leave(&type, t);
  }
  return type;
}

#define GST_TYPE_LIVE_AVATAR_KV_PRECISION (gst_live_avatar_kv_precision_get_type())
static GType gst_live_avatar_kv_precision_get_type(void) {
  static GType type = 0;
  static const GEnumValue values[] = {
      {GST_LIVE_AVATAR_KV_PRECISION_AUTO, "As the DiT's activations (fp32 with precision=fp32, else bf16)", "auto"},
      {GST_LIVE_AVATAR_KV_PRECISION_FP32, "32-bit float KV caches", "fp32"},
      {GST_LIVE_AVATAR_KV_PRECISION_BF16, "bfloat16 KV caches", "bf16"},
      {GST_LIVE_AVATAR_KV_PRECISION_FP8, "float8 e4m3 KV caches (a quarter of fp32's bytes, saturating at 448)",
       "fp8"},
      {0, nullptr, nullptr}};
  if (g_once_init_enter(&type)) {
    GType t = g_enum_register_static("GstLiveAvatarKvPrecision", values);
    g_once_init_leave(&type, t);
  }
  return type;
}

// Properties, copied under GST_OBJECT_LOCK; a snapshot is taken at READY->PAUSED.
struct Settings {
  GstLiveAvatarBackend backend = DEFAULT_BACKEND;
  int width = DEFAULT_WIDTH;
  int height = DEFAULT_HEIGHT;
  guint64 seed = DEFAULT_SEED;
  std::string mouth_box = DEFAULT_MOUTH_BOX;
  std::string model_dir = DEFAULT_MODEL_DIR;
  std::string lora = DEFAULT_LORA;
  std::string prompt = DEFAULT_PROMPT;
  GstLiveAvatarPrecision precision = DEFAULT_PRECISION;
  guint max_area = DEFAULT_MAX_AREA;
  GstLiveAvatarLagPolicy lag_policy = DEFAULT_LAG_POLICY;
  GstLiveAvatarParallel parallel = DEFAULT_PARALLEL;
  std::string devices = DEFAULT_DEVICES;
  GstLiveAvatarKvPrecision kv_precision = DEFAULT_KV_PRECISION;
  std::string rendezvous = DEFAULT_RENDEZVOUS;
  guint parallel_timeout = DEFAULT_PARALLEL_TIMEOUT;
  guint stats_interval = DEFAULT_STATS_INTERVAL;  // ms between "liveavatar-stats" messages; 0 = none
  std::string vad_model = DEFAULT_VAD_MODEL;      // silero_vad.jit; "" = the one found at build time
};

// Runtime state, touched only by the aggregate thread (and start/stop while that thread is stopped).
struct State {
  std::unique_ptr<liveavatar::Engine> engine;
  std::string engine_key;  // the settings the engine was made with: kept across stop/start while they match
  bool have_reference = false;
  GstBuffer* last_image = nullptr;  // to skip re-sending an identical picture (imagefreeze)
  GstVideoInfo out_info;
  bool out_negotiated = false;
  GstVideoConverter* to_i420 = nullptr;
  GstSegment audio_segment;  // the audio segment the timeline below belongs to
  bool have_segment = false;
  GstClockTime origin_rt = GST_CLOCK_TIME_NONE;  // running time of frame 0 / sample 0
  GstClockTime picture_end_rt = GST_CLOCK_TIME_NONE;  // the last picture's end (pts + duration); NONE: until replaced
  gint64 frames_out = 0;
  bool warned_no_image = false;
  std::string picture_warnings;  // what the current run of pictures was warned about (posted once, not per picture)
  bool finished = false;      // audio EOS: all frames pushed
  bool segment_done = false;  // SEGMENT_DONE: the tail is pushed; the next audio starts a new timeline
  // Live with a block model (threaded engine): frames the model does not make in time are replaced (lag-policy).
  GstBuffer* last_frame = nullptr;               // the last frame pushed, repeated by lag-policy=drop
  std::unique_ptr<liveavatar::Engine> stand_in;  // the puppet, fed the same audio, draws replaced frames
  liveavatar::EngineConfig config;                // what the engine was made with (the stand-in copies it)
  std::vector<uint8_t> reference_rgb;            // the current picture, for the stand-in
  int reference_width = 0, reference_height = 0;
  bool stalled = false;  // the next frame is overdue and its block waits for audio (get_next_time)
  gint64 resume_at = 0;  // after a stand-in: the first frame the model was asked to make in time (skip_to)
  gint64 steps_decided_at = -1;  // lag-policy=degrade: blocks_done when the step count was last decided
  gint64 stats_at_us = 0;        // monotonic time of the last stats message (0: none yet)
  gint64 stats_frames = 0;       // frames_out then
  std::unique_ptr<liveavatar::VoiceActivity> vad;  // "speaking" in the stats, fed what the engine is fed
  std::string vad_model;                           // the vad-model it was made with

  void clear_stream() {
    origin_rt = GST_CLOCK_TIME_NONE;
    picture_end_rt = GST_CLOCK_TIME_NONE;
    frames_out = 0;
    resume_at = 0;
    steps_decided_at = -1;
    stats_at_us = 0;
    stats_frames = 0;
    finished = false;
    segment_done = false;
    gst_buffer_replace(&last_frame, nullptr);
    if (engine) engine->reset();
    if (stand_in) stand_in->reset();
    if (vad) vad->reset();
  }
};

// backend=liveavatar: the model is loaded on this worker, so READY->PAUSED does not wait for it. The aggregate thread
// takes the engine once it is made; going to READY/NULL cancels the load at its next file or tensor.
struct Loader {
  std::thread thread;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;                             // under mu
  std::unique_ptr<liveavatar::Engine> engine;    // the result, under mu
  std::exception_ptr error;                      // or the failure, under mu
  std::atomic<bool> cancel{false};
  std::string key;                               // the settings it is made with (State::engine_key)
  int last_percent = -1;                         // worker only: progress messages when the percentage moves
  int last_file = -1;

  ~Loader() {
    cancel = true;
    if (thread.joinable()) thread.join();
  }
};

struct _GstLiveAvatarPrivate {
  Settings settings;
  State state;
  std::unique_ptr<Loader> loader;  // set by start (state change thread) while a model loads
  // QoS from downstream (under GST_OBJECT_LOCK): frames ending before earliest_time are reported late.
  GstClockTime qos_earliest = GST_CLOCK_TIME_NONE;
  guint64 qos_processed = 0;
  guint64 qos_late = 0;
  guint64 qos_dropped = 0;  // model frames not shown (lag-policy drop / puppet)
  // The element's own latency as last reported with gst_aggregator_set_latency (read by get_next_time).
  std::atomic<GstClockTime> own_latency{0};
  std::atomic<bool> need_reset{false};  // set by flushes, handled by the aggregate thread
  bool live = false;
  // Seeks: the seqnum of the last one handled (a pipeline sends one per sink), and of the last FLUSH_STOP that
  // reached the image pad (tells whether the image branch flushed for a seek).
  std::atomic<guint32> last_seek_seqnum{GST_SEQNUM_INVALID};
  std::atomic<bool> last_seek_result{false};
  std::atomic<guint32> image_flush_seqnum{GST_SEQNUM_INVALID};
};

// ---------------------------------------------------------------------------------------------------------------
// Helpers

static bool take_loaded_engine(GstLiveAvatar* self, GstFlowReturn* ret);

static bool parse_mouth_box(const std::string& text, liveavatar::Rect* r) {
  if (text.empty()) {
    *r = {};
    return true;
  }
  int v[4];
  char tail;
  if (sscanf(text.c_str(), "%d,%d,%d,%d%c", &v[0], &v[1], &v[2], &v[3], &tail) != 4) return false;
  if (v[0] < 0 || v[1] < 0 || v[2] <= 0 || v[3] <= 0) return false;
  *r = {v[0], v[1], v[2], v[3]};
  return true;
}

// LibTorch reports allocation failures as c10::Error ("DefaultCPUAllocator: not enough memory", "CUDA out of
// memory"); the plugin does not include LibTorch, so they are recognised by their text.
static bool is_out_of_memory(const char* what) {
  return strstr(what, "out of memory") || strstr(what, "not enough memory") || strstr(what, "Insufficient memory");
}

// Posts the exception being handled (call from a catch block) as an element error. Exceptions never unwind into
// GStreamer's C code, so every vfunc that reaches the engine ends in `catch (...) { post_current_exception(); }`.
// Nothing here allocates through operator new: it also reports std::bad_alloc.
static void post_current_exception(GstLiveAvatar* self, bool loading) {
  try {
    throw;
  } catch (const liveavatar::Error& e) {
    if (loading)
      GST_ELEMENT_ERROR(self, RESOURCE, SETTINGS, ("%s", e.what()), (nullptr));
    else
      GST_ELEMENT_ERROR(self, STREAM, FAILED, ("%s", e.what()), (nullptr));
  } catch (const std::bad_alloc& e) {
    GST_ELEMENT_ERROR(self, RESOURCE, NO_SPACE_LEFT,
                      ("Out of memory in the avatar engine: use a smaller width/height or portrait, or a machine with "
                       "more memory."),
                      ("%s", e.what()));
  } catch (const std::exception& e) {
    if (is_out_of_memory(e.what()))
      GST_ELEMENT_ERROR(self, RESOURCE, NO_SPACE_LEFT,
                        ("Out of memory in the avatar engine: use a smaller width/height, precision=bf16, or a device "
                         "with more memory."),
                        ("%s", e.what()));
    else
      GST_ELEMENT_ERROR(self, CORE, FAILED, ("Internal error in the avatar engine: %s", e.what()), (nullptr));
  } catch (...) {
    GST_ELEMENT_ERROR(self, CORE, FAILED, ("Internal error in the avatar engine (an unknown exception)."),
                      (nullptr));
  }
}

// Converts an image buffer with the pad's caps to packed RGB, scaling huge pictures down. Returns false (with an
// element error posted) when the caps are unusable.
static bool image_to_rgb(GstLiveAvatar* self, GstBuffer* buf, std::vector<uint8_t>* rgb, int* w, int* h) {
  GstCaps* caps = gst_pad_get_current_caps(GST_PAD(self->image_pad));
  GstVideoInfo in;
  bool ok = caps && gst_video_info_from_caps(&in, caps);
  if (caps) gst_caps_unref(caps);
  if (!ok) {
    GST_ELEMENT_ERROR(self, STREAM, FORMAT, ("The image pad received a picture without usable caps."),
                      ("put videoconvert before the image pad"));
    return false;
  }
  int ow = GST_VIDEO_INFO_WIDTH(&in), oh = GST_VIDEO_INFO_HEIGHT(&in);
  if (std::max(ow, oh) > kMaxImageSide) {
    const double s = static_cast<double>(kMaxImageSide) / std::max(ow, oh);
    ow = std::max(1, static_cast<int>(ow * s));
    oh = std::max(1, static_cast<int>(oh * s));
  }
  GstVideoInfo out;
  gst_video_info_set_format(&out, GST_VIDEO_FORMAT_RGB, ow, oh);
  GST_VIDEO_INFO_FPS_N(&out) = GST_VIDEO_INFO_FPS_N(&in);  // the converter insists on equal rates
  GST_VIDEO_INFO_FPS_D(&out) = GST_VIDEO_INFO_FPS_D(&in);
  GstVideoFrame inf, outf;
  if (!gst_video_frame_map(&inf, &in, buf, GST_MAP_READ)) {
    GST_ELEMENT_ERROR(self, STREAM, DECODE, ("The image buffer is smaller than its caps say."),
                      ("%" GST_PTR_FORMAT, buf));
    return false;
  }
  GstBuffer* outbuf = gst_buffer_new_allocate(nullptr, GST_VIDEO_INFO_SIZE(&out), nullptr);
  gst_video_frame_map(&outf, &out, outbuf, GST_MAP_WRITE);
  GstVideoConverter* conv = gst_video_converter_new(&in, &out, nullptr);
  gst_video_converter_frame(conv, &inf, &outf);
  gst_video_converter_free(conv);
  rgb->resize(static_cast<size_t>(ow) * oh * 3);
  const guint8* src = static_cast<const guint8*>(GST_VIDEO_FRAME_PLANE_DATA(&outf, 0));
  const int stride = GST_VIDEO_FRAME_PLANE_STRIDE(&outf, 0);
  for (int y = 0; y < oh; ++y) memcpy(rgb->data() + static_cast<size_t>(y) * ow * 3, src + y * stride, ow * 3);
  gst_video_frame_unmap(&outf);
  gst_video_frame_unmap(&inf);
  gst_buffer_unref(outbuf);
  *w = ow;
  *h = oh;
  return true;
}

static bool same_image(GstBuffer* a, GstBuffer* b) {
  if (!a || !b) return false;
  if (a == b) return true;
  if (gst_buffer_get_size(a) != gst_buffer_get_size(b)) return false;
  GstMapInfo ma, mb;
  if (!gst_buffer_map(a, &ma, GST_MAP_READ)) return false;
  bool same = false;
  if (gst_buffer_map(b, &mb, GST_MAP_READ)) {
    same = ma.data == mb.data || memcmp(ma.data, mb.data, ma.size) == 0;
    gst_buffer_unmap(b, &mb);
  }
  gst_buffer_unmap(a, &ma);
  return same;
}

// Negotiates the output caps around the size the engine wants (or the width/height properties).
static bool negotiate_output(GstLiveAvatar* self) {
  GstAggregator* agg = GST_AGGREGATOR(self);
  if (!gst_aggregator_negotiate(agg)) {
    GST_ELEMENT_ERROR(self, CORE, NEGOTIATION, ("Downstream does not accept the avatar video."),
                      ("liveavatar outputs RGB or I420 at 25/1; add videoconvert/videoscale after it"));
    return false;
  }
  return self->priv->state.out_negotiated;
}

// Downstream said (QoS event) that buffers before earliest_time arrive too late. Every frame is still pushed, since
// encoders and muxers need a gap-free timeline, but the lateness is reported with a QoS message so applications can
// see that the backend does not keep up (and pick a lighter backend or a smaller size).
// A frame the model did not make in time (live, lag-policy drop or puppet) is reported the same way, with the model
// frames replaced so far as "dropped".
static void report_lateness(GstLiveAvatar* self, GstClockTime rt, GstClockTime rt_end, GstClockTime pts,
                            bool replaced) {
  GstLiveAvatarPrivate* priv = self->priv;
  GST_OBJECT_LOCK(self);
  priv->qos_processed++;
  if (replaced) priv->qos_dropped++;
  const bool late = GST_CLOCK_TIME_IS_VALID(priv->qos_earliest) && rt_end <= priv->qos_earliest;
  if (late) priv->qos_late++;
  const guint64 processed = priv->qos_processed, late_count = priv->qos_late, dropped = priv->qos_dropped;
  GST_OBJECT_UNLOCK(self);
  if (!late && !replaced) return;
  const GstSegment* seg = &GST_AGGREGATOR_PAD(GST_AGGREGATOR(self)->srcpad)->segment;
  GstMessage* m = gst_message_new_qos(GST_OBJECT(self), priv->live, rt,
                                      gst_segment_to_stream_time(seg, GST_FORMAT_TIME, pts), pts, rt_end - rt);
  // "processed" counts every frame pushed; "dropped" the model frames replaced by a stand-in (a frame is never
  // left out of the stream: encoders and muxers need a gap-free timeline).
  gst_message_set_qos_stats(m, GST_FORMAT_BUFFERS, processed, dropped);
  // quality: the model's share of its full denoising steps for the blocks now made (lag-policy=degrade lowers it).
  const liveavatar::EngineStats es = self->priv->state.engine->stats();
  gst_message_set_qos_values(m, 0, 1.0, static_cast<gint>(1000000LL * es.steps / std::max(1, es.steps_full)));
  GST_DEBUG_OBJECT(self, "frame at %" GST_TIME_FORMAT " is late (%" G_GUINT64_FORMAT " of %" G_GUINT64_FORMAT ")",
                   GST_TIME_ARGS(rt), late_count, processed);
  gst_element_post_message(GST_ELEMENT(self), m);
}

// Timestamps buffer as frame `index` of the stream and pushes it; `replaced`: a stand-in for a model frame.
static GstFlowReturn push_buffer(GstLiveAvatar* self, GstBuffer* buf, gint64 index, bool replaced) {
  State& st = self->priv->state;
  GstAggregator* agg = GST_AGGREGATOR(self);
  const GstSegment* seg = &GST_AGGREGATOR_PAD(agg->srcpad)->segment;
  const GstClockTime rt = st.origin_rt + gst_util_uint64_scale(index, GST_SECOND * kFpsD, kFpsN);
  const GstClockTime rt_end = st.origin_rt + gst_util_uint64_scale(index + 1, GST_SECOND * kFpsD, kFpsN);
  const GstClockTime pts = gst_segment_position_from_running_time(seg, GST_FORMAT_TIME, rt);
  const GstClockTime end = gst_segment_position_from_running_time(seg, GST_FORMAT_TIME, rt_end);
  GST_BUFFER_PTS(buf) = pts;
  GST_BUFFER_DTS(buf) = GST_CLOCK_TIME_NONE;
  GST_BUFFER_DURATION(buf) = GST_CLOCK_TIME_IS_VALID(end) && GST_CLOCK_TIME_IS_VALID(pts) ? end - pts : kFrameDuration;
  GST_BUFFER_OFFSET(buf) = index;
  GST_BUFFER_OFFSET_END(buf) = index + 1;
  if (index == 0) GST_BUFFER_FLAG_SET(buf, GST_BUFFER_FLAG_DISCONT);
  st.frames_out = index + 1;
  report_lateness(self, rt, rt_end, pts, replaced);
  GST_AGGREGATOR_PAD(agg->srcpad)->segment.position = GST_CLOCK_TIME_IS_VALID(end) ? end : pts;
  GST_LOG_OBJECT(self, "frame %" G_GINT64_FORMAT " pts %" GST_TIME_FORMAT "%s", index, GST_TIME_ARGS(pts),
                 replaced ? " (stand-in)" : "");
  if (self->priv->live) gst_buffer_replace(&st.last_frame, buf);
  return gst_aggregator_finish_buffer(agg, buf);
}

// One frame from the engine (or the stand-in puppet) -> a timestamped buffer downstream.
static GstFlowReturn push_frame(GstLiveAvatar* self, const liveavatar::Frame& f, gint64 index, bool replaced) {
  State& st = self->priv->state;
  const GstVideoInfo* info = &st.out_info;
  if (f.width != GST_VIDEO_INFO_WIDTH(info) || f.height != GST_VIDEO_INFO_HEIGHT(info)) {
    GST_ELEMENT_ERROR(self, CORE, FAILED, ("Internal error: frame size does not match the caps."),
                      ("frame %dx%d, caps %dx%d", f.width, f.height, GST_VIDEO_INFO_WIDTH(info),
                       GST_VIDEO_INFO_HEIGHT(info)));
    return GST_FLOW_ERROR;
  }
  GstBuffer* buf = gst_buffer_new_allocate(nullptr, GST_VIDEO_INFO_SIZE(info), nullptr);
  GstVideoFrame vf;
  gst_video_frame_map(&vf, info, buf, GST_MAP_WRITE);
  if (GST_VIDEO_INFO_FORMAT(info) == GST_VIDEO_FORMAT_RGB) {
    guint8* dst = static_cast<guint8*>(GST_VIDEO_FRAME_PLANE_DATA(&vf, 0));
    const int stride = GST_VIDEO_FRAME_PLANE_STRIDE(&vf, 0);
    for (int y = 0; y < f.height; ++y) memcpy(dst + y * stride, f.rgb.data() + static_cast<size_t>(y) * f.width * 3,
                                              static_cast<size_t>(f.width) * 3);
  } else {
    // Wrap the engine's packed RGB (no copy) and convert into the I420 buffer.
    GstVideoInfo rgb_info;
    gst_video_info_set_format(&rgb_info, GST_VIDEO_FORMAT_RGB, f.width, f.height);
    GST_VIDEO_INFO_FPS_N(&rgb_info) = GST_VIDEO_INFO_FPS_N(info);
    GST_VIDEO_INFO_FPS_D(&rgb_info) = GST_VIDEO_INFO_FPS_D(info);
    GST_VIDEO_INFO_PLANE_STRIDE(&rgb_info, 0) = f.width * 3;
    GST_VIDEO_INFO_SIZE(&rgb_info) = f.rgb.size();
    GstBuffer* rgb = gst_buffer_new_wrapped_full(GST_MEMORY_FLAG_READONLY, const_cast<uint8_t*>(f.rgb.data()),
                                                 f.rgb.size(), 0, f.rgb.size(), nullptr, nullptr);
    GstVideoFrame rf;
    gst_video_frame_map(&rf, &rgb_info, rgb, GST_MAP_READ);
    if (!st.to_i420) st.to_i420 = gst_video_converter_new(&rgb_info, const_cast<GstVideoInfo*>(info), nullptr);
    gst_video_converter_frame(st.to_i420, &rf, &vf);
    gst_video_frame_unmap(&rf);
    gst_buffer_unref(rgb);
  }
  gst_video_frame_unmap(&vf);
  return push_buffer(self, buf, index, replaced);
}

// Rank 0's plan (plan, devices, bytes per device) as an element message "liveavatar-plan", and in the log.
static void post_plan(GstLiveAvatar* self, liveavatar::Engine& engine) {
  const liveavatar::ExecutionPlan plan = engine.execution_plan();
  if (plan.parallel.empty()) return;  // the puppet has none
  GST_INFO_OBJECT(self, "plan: %s", plan.summary.c_str());
  GValue devices = G_VALUE_INIT, roles = G_VALUE_INIT, bytes = G_VALUE_INIT, free_bytes = G_VALUE_INIT;
  gst_value_array_init(&devices, plan.devices.size());
  gst_value_array_init(&roles, plan.devices.size());
  gst_value_array_init(&bytes, plan.devices.size());
  gst_value_array_init(&free_bytes, plan.devices.size());
  for (const auto& d : plan.devices) {
    GValue v = G_VALUE_INIT;
    g_value_init(&v, G_TYPE_STRING);
    g_value_set_string(&v, d.device.c_str());
    gst_value_array_append_value(&devices, &v);
    g_value_set_string(&v, d.role.c_str());
    gst_value_array_append_value(&roles, &v);
    g_value_unset(&v);
    g_value_init(&v, G_TYPE_UINT64);
    g_value_set_uint64(&v, d.bytes);
    gst_value_array_append_value(&bytes, &v);
    g_value_set_uint64(&v, d.free_bytes);
    gst_value_array_append_value(&free_bytes, &v);
    g_value_unset(&v);
  }
  GstStructure* s = gst_structure_new("liveavatar-plan", "parallel", G_TYPE_STRING, plan.parallel.c_str(), "ranks",
                                      G_TYPE_INT, static_cast<int>(plan.devices.size()), "precision", G_TYPE_STRING,
                                      plan.precision.c_str(), "kv-precision", G_TYPE_STRING,
                                      plan.kv_precision.c_str(), "rendezvous", G_TYPE_STRING,
                                      plan.rendezvous.c_str(), "companions", G_TYPE_STRING,
                                      plan.companions.c_str(), "text-encoder", G_TYPE_STRING,
                                      plan.text_encoder.c_str(), "summary", G_TYPE_STRING, plan.summary.c_str(),
                                      nullptr);
  gst_structure_take_value(s, "devices", &devices);
  gst_structure_take_value(s, "roles", &roles);
  gst_structure_take_value(s, "bytes", &bytes);
  gst_structure_take_value(s, "free-bytes", &free_bytes);
  gst_element_post_message(GST_ELEMENT(self), gst_message_new_element(GST_OBJECT(self), s));
}

static void post_engine_warnings(GstLiveAvatar* self) {
  for (const auto& w : self->priv->state.engine->take_warnings())
    GST_ELEMENT_WARNING(self, STREAM, FAILED, ("%s", w.c_str()), (nullptr));
}

// Warnings about a picture ("no face found") are posted once for a run of pictures that earn the same ones, not for
// every picture of a moving image; a picture without warnings ends the run.
static void post_picture_warnings(GstLiveAvatar* self) {
  State& st = self->priv->state;
  std::string all;
  for (const auto& w : st.engine->take_warnings()) {
    all += w + "\n";
    if (st.picture_warnings.find(w + "\n") == std::string::npos)
      GST_ELEMENT_WARNING(self, STREAM, FAILED, ("%s", w.c_str()), (nullptr));
  }
  st.picture_warnings = all;
}

// Audio for the engine and for the stand-in puppet (live, lag-policy drop/puppet), which follows the same timeline.
static void push_audio(State& st, const float* samples, size_t n) {
  st.engine->push_audio(samples, n);
  if (st.stand_in) st.stand_in->push_audio(samples, n);
  if (st.vad) st.vad->push(samples, n);
}
static void push_silence(State& st, size_t n) {
  st.engine->push_silence(n);
  if (st.stand_in) st.stand_in->push_silence(n);
  if (st.vad) {
    static const std::vector<float> zeros(liveavatar::VoiceActivity::kWindow, 0.f);
    for (size_t left = n; left > 0;) {
      const size_t k = std::min(left, zeros.size());
      st.vad->push(zeros.data(), k);
      left -= k;
    }
  }
}

static GstLiveAvatarLagPolicy lag_policy(GstLiveAvatar* self) {
  GST_OBJECT_LOCK(self);
  const GstLiveAvatarLagPolicy p = self->priv->settings.lag_policy;
  GST_OBJECT_UNLOCK(self);
  return p;
}

// The pipeline clock's running time now; NONE without a clock.
static GstClockTime running_time_now(GstLiveAvatar* self) {
  GstClock* clock = gst_element_get_clock(GST_ELEMENT(self));
  if (!clock) return GST_CLOCK_TIME_NONE;
  const GstClockTime now = gst_clock_get_time(clock);
  gst_object_unref(clock);
  const GstClockTime base = gst_element_get_base_time(GST_ELEMENT(self));
  return now > base ? now - base : 0;
}

// The element's own latency: from a sample arriving to its frame being ready. The puppet draws a frame as soon as
// its audio is in: one frame. A block model (the engine's worker) needs a block of audio, the processing of a block
// and, with lag-policy=wait, the blocks queued ahead (Engine::latency()); with drop/puppet the queued blocks are
// skipped instead of waited for, so only one block's processing counts.
// A block model gets one frame more: its last frame's audio and the block's start are not the same instant (a block
// made of silence while the audio is late starts right when that silence is due).
static void adapt_steps(GstLiveAvatar* self, GstLiveAvatarLagPolicy policy);

static GstClockTime own_latency(GstLiveAvatar* self, GstLiveAvatarLagPolicy policy) {
  const liveavatar::EngineStats s = self->priv->state.engine->stats();
  if (!s.threaded) return kFrameDuration;
  if (policy == GST_LIVE_AVATAR_LAG_POLICY_WAIT)
    return static_cast<GstClockTime>(self->priv->state.engine->latency().count()) + kFrameDuration;
  return (s.frames_per_block + 1) * kFrameDuration + static_cast<GstClockTime>(s.ms_per_block * GST_MSECOND);
}

// Reports the latency when it rose by more than a frame, or fell by more than a block (a model's figure swings by
// one block's processing as each block starts and ends; it is not worth a new pipeline latency each time).
// gst_aggregator_set_latency posts the LATENCY message; the application then redistributes the latency.
static void update_latency(GstLiveAvatar* self, bool force = false) {
  const liveavatar::EngineStats s = self->priv->state.engine->stats();
  const GstClockTime now = own_latency(self, lag_policy(self));
  const GstClockTime was = self->priv->own_latency.load();
  if (!force && now <= was + kFrameDuration && now + s.frames_per_block * kFrameDuration >= was) return;
  GST_INFO_OBJECT(self, "latency %" GST_TIME_FORMAT " (was %" GST_TIME_FORMAT ")", GST_TIME_ARGS(now),
                  GST_TIME_ARGS(was));
  self->priv->own_latency = now;
  // A block model keeps the audio it is given (the engine's queue): it can buffer any latency upstream needs.
  gst_aggregator_set_latency(GST_AGGREGATOR(self), now, s.threaded ? GST_CLOCK_TIME_NONE : now);
}

// Running time at which frame `index` starts.
static GstClockTime frame_start_rt(const State& st, gint64 index) {
  return st.origin_rt + gst_util_uint64_scale(index, GST_SECOND * kFpsD, kFpsN);
}

// Running time of an image timestamp; NONE while the image pad has no time segment (e.g. it is being flushed by a
// seek on another thread).
static GstClockTime image_running_time(GstLiveAvatar* self, GstClockTime ts) {
  GstSegment seg;
  GST_OBJECT_LOCK(self->image_pad);
  gst_segment_copy_into(&self->image_pad->segment, &seg);
  GST_OBJECT_UNLOCK(self->image_pad);
  return seg.format == GST_FORMAT_TIME ? gst_segment_to_running_time(&seg, GST_FORMAT_TIME, ts) : GST_CLOCK_TIME_NONE;
}

// Takes the image buffers that are due for the next frame (frames_out) and makes the newest one the reference. A
// picture is due once the next frame starts at or after its running time, so pictures queued ahead of the audio take
// effect at their own frame. Until the audio timeline is known only the first picture is taken. Returns false (with
// an element error posted) when a picture is unusable.
static bool consume_images(GstLiveAvatar* self) {
  State& st = self->priv->state;
  GstBuffer* buf;
  while ((buf = gst_aggregator_pad_peek_buffer(self->image_pad))) {
    bool due = !st.have_reference || !GST_BUFFER_PTS_IS_VALID(buf);
    if (!due && GST_CLOCK_TIME_IS_VALID(st.origin_rt)) {
      const GstClockTime rt = image_running_time(self, GST_BUFFER_PTS(buf));
      due = !GST_CLOCK_TIME_IS_VALID(rt) || rt <= frame_start_rt(st, st.frames_out);
    }
    if (!due) {
      gst_buffer_unref(buf);
      break;
    }
    gst_aggregator_pad_drop_buffer(self->image_pad);
    st.picture_end_rt = GST_CLOCK_TIME_NONE;
    if (GST_BUFFER_PTS_IS_VALID(buf) && GST_BUFFER_DURATION_IS_VALID(buf))
      st.picture_end_rt = image_running_time(self, GST_BUFFER_PTS(buf) + GST_BUFFER_DURATION(buf));
    if (same_image(st.last_image, buf)) {
      gst_buffer_unref(buf);
      continue;
    }
    std::vector<uint8_t> rgb;
    int w = 0, h = 0;
    if (!image_to_rgb(self, buf, &rgb, &w, &h)) {
      gst_buffer_unref(buf);
      return false;
    }
    gst_buffer_replace(&st.last_image, buf);
    gst_buffer_unref(buf);
    liveavatar::ImageView view;
    view.data = rgb.data();
    view.width = w;
    view.height = h;
    view.stride = w * 3;
    view.format = liveavatar::PixelFormat::kRGB8;
    st.engine->set_reference(view);  // throws liveavatar::Error for unusable pictures
    post_picture_warnings(self);
    if (st.stand_in) {
      st.stand_in->set_reference(view);
      st.stand_in->take_warnings();  // the engine's own warnings were posted
    }
    st.reference_rgb.swap(rgb);
    st.reference_width = w;
    st.reference_height = h;
    GST_INFO_OBJECT(self, "reference %dx%d from frame %" G_GINT64_FORMAT ", output %dx%d", w, h, st.frames_out,
                    st.engine->output_size().width, st.engine->output_size().height);
    if (!st.have_reference) {
      st.have_reference = true;
      if (!negotiate_output(self)) return false;
    }
  }
  return true;
}

// Live with a block model and lag-policy drop/puppet: the puppet on the same portrait, fed the same audio, so it can
// draw any frame the model does not make in time. Made when first needed; mid-stream it starts with silence.
static void ensure_stand_in(GstLiveAvatar* self) {
  State& st = self->priv->state;
  if (st.stand_in || st.reference_rgb.empty()) return;
  liveavatar::EngineConfig c = st.config;
  c.backend = "puppet";
  c.worker = "inline";
  c.testing_block_delay_ms = 0;
  const liveavatar::Size size = st.engine->output_size();
  c.width = size.width;
  c.height = size.height;
  auto e = liveavatar::Engine::create(c);
  liveavatar::ImageView view;
  view.data = st.reference_rgb.data();
  view.width = st.reference_width;
  view.height = st.reference_height;
  view.stride = st.reference_width * 3;
  e->set_reference(view);
  e->take_warnings();
  if (st.engine->samples_pushed() > 0) e->push_silence(static_cast<size_t>(st.engine->samples_pushed()));
  e->skip_to(st.frames_out);
  st.stand_in = std::move(e);
  GST_INFO_OBJECT(self, "stand-in puppet ready from frame %" G_GINT64_FORMAT, st.frames_out);
}

// Pushes a stand-in for the model's frame `frames_out` (lag-policy drop: the last frame again; puppet, or drop
// before any frame: the puppet's frame). Returns GST_FLOW_CUSTOM_SUCCESS when nothing could stand in.
static GstFlowReturn replace_frame(GstLiveAvatar* self, GstLiveAvatarLagPolicy policy) {
  State& st = self->priv->state;
  if (policy == GST_LIVE_AVATAR_LAG_POLICY_DEGRADE) policy = GST_LIVE_AVATAR_LAG_POLICY_DROP;
  const gint64 k = st.frames_out;
  GstFlowReturn ret = GST_FLOW_CUSTOM_SUCCESS;
  if (policy == GST_LIVE_AVATAR_LAG_POLICY_DROP && st.last_frame) {
    ret = push_buffer(self, gst_buffer_copy(st.last_frame), k, /*replaced=*/true);  // shares the pixels
  } else if (st.stand_in) {
    st.stand_in->skip_to(k);
    liveavatar::Frame f;
    if (st.stand_in->pop_frame(&f)) ret = push_frame(self, f, k, /*replaced=*/true);
  }
  if (ret == GST_FLOW_CUSTOM_SUCCESS && st.last_frame)
    ret = push_buffer(self, gst_buffer_copy(st.last_frame), k, /*replaced=*/true);
  return ret;
}

// After a stand-in: tells the engine which frames are stale, those whose time comes before a block started now could
// be made, so it skips their blocks and catches up. Once per lag: until the model reaches that frame the target stays
// (moving it on with every stand-in would make every block the model finishes stale).
static void skip_stale(GstLiveAvatar* self, GstClockTime now, GstClockTime latency) {
  State& st = self->priv->state;
  const gint64 k = st.frames_out - 1;  // the frame just replaced
  if (k < st.resume_at) return;
  const liveavatar::EngineStats s = st.engine->stats();
  // A block started now is ready after its processing; one is probably in progress already (it cannot be stopped
  // part-way without losing the model's state), which the new one waits for.
  const int busy = s.frames_pending >= s.frames_per_block ? 1 : 0;
  // lag-policy=degrade may just have lowered the steps: the next blocks take that share of the last one's time.
  const double block_ms =
      s.steps_last_block > 0 ? s.ms_per_block * s.steps / s.steps_last_block : s.ms_per_block;
  const GstClockTime ready = now + static_cast<GstClockTime>((1 + busy) * block_ms * GST_MSECOND);
  gint64 first_in_time = k + 1;
  if (ready > st.origin_rt + latency)
    first_in_time = std::max<gint64>(
        first_in_time, static_cast<gint64>(gst_util_uint64_scale_ceil(ready - st.origin_rt - latency, kFpsN,
                                                                      GST_SECOND * kFpsD)));
  st.engine->skip_to(first_in_time);
  st.resume_at = first_in_time;
  GST_DEBUG_OBJECT(self, "frame %" G_GINT64_FORMAT " not ready in time: stand-in; model resumes at frame %" G_GINT64_FORMAT,
                   k, first_in_time);
}

// Pushes the frames the engine has ready. Pictures that fall due between two frames are taken in between, so each
// frame is drawn with the picture of its own time even when one audio buffer completes many frames. Not live, when
// the last picture has a duration that ends before the next frame (a moving picture) and the next picture is not
// queued yet, it stops and sets *waiting: the frame is drawn once that picture arrives or the image pad ends. A
// picture without a duration (a still) holds until replaced; live, the clock does not wait for pictures.
//
// Live with a block model (the engine's worker), frames are paced by their deadline: running time + the latency.
// Before it, a frame not made yet is left to the next call (the aggregator wakes us at the deadline, or when audio
// comes). At it, lag-policy decides: wait (block in short slices until the model delivers, leaving at once when audio
// waits to be taken), or drop/puppet (a stand-in, and the model skips the stale blocks). At the end of the stream
// (at_end) or with too much audio queued in the engine (backlog) there is no audio to take: it blocks until done.
static GstFlowReturn drain_frames(GstLiveAvatar* self, bool* waiting = nullptr, bool at_end = false,
                                  bool backlog = false) {
  GstLiveAvatarPrivate* priv = self->priv;
  State& st = priv->state;
  GstAggregator* agg = GST_AGGREGATOR(self);
  const bool paced = priv->live && st.engine->stats().threaded;
  if (paced && lag_policy(self) != GST_LIVE_AVATAR_LAG_POLICY_WAIT && st.out_negotiated) ensure_stand_in(self);
  liveavatar::Frame f;
  std::chrono::milliseconds wait{0};
  bool waited = false;
  st.stalled = false;
  for (;;) {
    if (!consume_images(self)) return GST_FLOW_ERROR;
    if (waiting && !priv->live && GST_CLOCK_TIME_IS_VALID(st.picture_end_rt) &&
        GST_CLOCK_TIME_IS_VALID(st.origin_rt) && frame_start_rt(st, st.frames_out) >= st.picture_end_rt &&
        !gst_aggregator_pad_is_eos(self->image_pad) && !gst_aggregator_pad_has_buffer(self->image_pad)) {
      *waiting = true;
      break;
    }
    bool got;
    if (paced) {
      got = st.engine->wait_frame(&f, wait);
      wait = std::chrono::milliseconds{0};
    } else {
      got = st.engine->pop_frame(&f);
      // Not live: wait for the blocks whose audio is in (two blocks pending guarantee one can be made: the audio
      // features' lookahead is less than a block). Otherwise a muxer that interleaves this video with the same audio
      // stalls the audio branch while the frames it needs sit in the engine's queue, and nothing calls us again.
      while (!got && !priv->live && !priv->need_reset.load()) {
        const liveavatar::EngineStats s = st.engine->stats();
        if (!s.threaded || s.frames_pending < 2 * s.frames_per_block) break;
        got = st.engine->wait_frame(&f, std::chrono::milliseconds(100));
      }
    }
    if (got) {
      const GstLiveAvatarLagPolicy policy = lag_policy(self);
      // Frames the engine skipped (skip_to) and that have no stand-in yet get one now, before the model's frame.
      while (st.frames_out < f.index) {
        GstFlowReturn r = replace_frame(
            self, policy == GST_LIVE_AVATAR_LAG_POLICY_WAIT ? GST_LIVE_AVATAR_LAG_POLICY_DROP : policy);
        if (r == GST_FLOW_CUSTOM_SUCCESS) break;
        if (r != GST_FLOW_OK) return r;
      }
      GstFlowReturn ret = push_frame(self, f, f.index, /*replaced=*/false);
      if (ret != GST_FLOW_OK) return ret;
      if (priv->need_reset.load()) break;  // a flush arrived: stop pushing stale frames
      continue;
    }
    if (!paced || priv->need_reset.load()) break;
    if (st.engine->done()) {
      // The engine was told to skip past its last frames: they get stand-ins, so the video lasts as long as the audio.
      const gint64 spf = st.engine->samples_per_frame();
      if (!at_end || st.frames_out >= (st.engine->samples_pushed() + spf - 1) / spf) break;
      const GstLiveAvatarLagPolicy policy = lag_policy(self);
      GstFlowReturn r =
          replace_frame(self, policy == GST_LIVE_AVATAR_LAG_POLICY_WAIT ? GST_LIVE_AVATAR_LAG_POLICY_DROP : policy);
      if (r == GST_FLOW_OK) continue;
      if (r != GST_FLOW_CUSTOM_SUCCESS) return r;
      break;
    }
    // The next frame's audio is not all in: the idle fill's business (aggregate), not the model's.
    if (!at_end && (st.frames_out + 1) * st.engine->samples_per_frame() > st.engine->samples_pushed()) break;
    const GstClockTime now = running_time_now(self);
    const GstClockTime latency = gst_aggregator_get_latency(agg);
    if (!GST_CLOCK_TIME_IS_VALID(now) || !GST_CLOCK_TIME_IS_VALID(latency)) break;
    const GstClockTime deadline = frame_start_rt(st, st.frames_out) + latency;
    const bool overdue = now >= deadline;
    const GstLiveAvatarLagPolicy policy = lag_policy(self);
    if (overdue && policy != GST_LIVE_AVATAR_LAG_POLICY_WAIT) {
      GstFlowReturn r = replace_frame(self, policy);
      if (r == GST_FLOW_OK) {
        adapt_steps(self, policy);  // degrade: the steps come down before the model is told where to resume
        skip_stale(self, now, latency);
        continue;
      }
      if (r != GST_FLOW_CUSTOM_SUCCESS) return r;
    }
    // Waiting only helps when the block of the next frame has all its audio (the frames pending start with it).
    const liveavatar::EngineStats s = st.engine->stats();
    if (!at_end && s.frames_pending < s.frames_per_block) {
      st.stalled = overdue;  // get_next_time then wakes us when audio is due, not at the passed deadline
      break;
    }
    const bool may_block = at_end || (backlog && s.frames_pending > kMaxPendingFrames);
    // Otherwise one slice, then back to the aggregator: queued events and audio are handled there.
    if (!may_block && (!overdue || waited || gst_aggregator_pad_has_buffer(self->audio_pad))) break;
    waited = true;
    wait = overdue ? kWaitSlice
                   : std::min<std::chrono::milliseconds>(
                         kWaitSlice, std::chrono::milliseconds((deadline - now) / GST_MSECOND + 1));
  }
  if (st.stand_in && st.frames_out > 0) st.stand_in->skip_to(st.frames_out);  // its queue stays bounded
  return GST_FLOW_OK;
}

// End of the audio (EOS or the end of a segment seek): the partial last frame is drawn and the frames pushed.
static GstFlowReturn finish_audio(GstLiveAvatar* self, bool* waiting = nullptr) {
  State& st = self->priv->state;
  st.engine->finish();  // a second call (after waiting for a picture) does nothing
  if (st.stand_in) st.stand_in->finish();
  return drain_frames(self, waiting, /*at_end=*/true);
}

// Keeps the output segment and the audio timeline in step with the audio pad's segment.
static void sync_segment(GstLiveAvatar* self) {
  State& st = self->priv->state;
  GstSegment seg;
  GST_OBJECT_LOCK(self->audio_pad);
  gst_segment_copy_into(&self->audio_pad->segment, &seg);
  GST_OBJECT_UNLOCK(self->audio_pad);
  if (seg.format != GST_FORMAT_TIME) return;
  if (st.have_segment && gst_segment_is_equal(&seg, &st.audio_segment)) return;
  GST_DEBUG_OBJECT(self, "audio segment %" GST_SEGMENT_FORMAT, &seg);
  st.audio_segment = seg;
  st.have_segment = true;
  gst_aggregator_update_segment(GST_AGGREGATOR(self), &seg);
}

// Feeds one audio buffer, filling gaps with silence and dropping audio that overlaps what is already covered.
static void feed_audio(GstLiveAvatar* self, GstBuffer* buf) {
  State& st = self->priv->state;
  const GstSegment* seg = &st.audio_segment;
  GstClockTime rt = GST_CLOCK_TIME_NONE;
  if (GST_BUFFER_PTS_IS_VALID(buf)) rt = gst_segment_to_running_time(seg, GST_FORMAT_TIME, GST_BUFFER_PTS(buf));

  if (!GST_CLOCK_TIME_IS_VALID(st.origin_rt)) {
    // Non-live: frame 0 starts at the segment start, so leading silence is kept. Live: at the first sample.
    GstClockTime start_rt = gst_segment_to_running_time(seg, GST_FORMAT_TIME, seg->start);
    st.origin_rt = (!self->priv->live && GST_CLOCK_TIME_IS_VALID(start_rt)) ? start_rt
                   : GST_CLOCK_TIME_IS_VALID(rt)                               ? rt
                                                                               : 0;
    if (GST_CLOCK_TIME_IS_VALID(rt) && rt < st.origin_rt) st.origin_rt = rt;
  }

  GstMapInfo map;
  gsize n = 0;
  const float* samples = nullptr;
  const bool gap = GST_BUFFER_FLAG_IS_SET(buf, GST_BUFFER_FLAG_GAP) || gst_buffer_get_size(buf) == 0;
  bool mapped = false;
  if (!gap && gst_buffer_map(buf, &map, GST_MAP_READ)) {
    mapped = true;
    samples = reinterpret_cast<const float*>(map.data);
    n = map.size / sizeof(float);
  } else if (GST_BUFFER_DURATION_IS_VALID(buf)) {
    n = gst_util_uint64_scale_round(GST_BUFFER_DURATION(buf), kRate, GST_SECOND);  // a gap: silence
  }

  gint64 skip = 0;
  if (GST_CLOCK_TIME_IS_VALID(rt)) {
    const gint64 at = rt >= st.origin_rt ? static_cast<gint64>(gst_util_uint64_scale_round(rt - st.origin_rt, kRate,
                                                                                          GST_SECOND))
                                         : -static_cast<gint64>(gst_util_uint64_scale_round(st.origin_rt - rt, kRate,
                                                                                           GST_SECOND));
    const gint64 have = st.engine->samples_pushed();
    const gint64 tolerance = kRate / 1000;  // 1 ms of timestamp jitter counts as contiguous
    if (at > have + tolerance) {
      GST_DEBUG_OBJECT(self, "audio gap of %" G_GINT64_FORMAT " samples: filling with silence", at - have);
      push_silence(st, static_cast<size_t>(at - have));
    } else if (at < have - tolerance) {
      skip = std::min<gint64>(have - at, static_cast<gint64>(n));
      GST_DEBUG_OBJECT(self, "dropping %" G_GINT64_FORMAT " samples that arrived after their frame", skip);
    }
  }
  if (static_cast<gint64>(n) > skip) {
    if (samples)
      push_audio(st, samples + skip, n - skip);
    else
      push_silence(st, n - skip);
  }
  if (mapped) gst_buffer_unmap(buf, &map);
}

// Live with a block model, lag-policy=degrade: after each block, the denoising steps of the next ones. A block must
// be made within its own duration (480 ms) or the model falls behind; the time per step is the last block's time
// over its steps. Too slow (over 95 % of the block's time) or audio piling up (more than two blocks waiting): the
// largest count that fits in 85 %, at least one step fewer. Room again (one more step fits in 80 %, nothing piled
// up): one step more per block, up to the full count. Other policies run every block at the full count.
static void adapt_steps(GstLiveAvatar* self, GstLiveAvatarLagPolicy policy) {
  State& st = self->priv->state;
  const liveavatar::EngineStats s = st.engine->stats();
  if (!s.threaded || s.steps_full <= 1) return;
  if (policy != GST_LIVE_AVATAR_LAG_POLICY_DEGRADE || !self->priv->live) {
    if (s.steps != s.steps_full) st.engine->set_denoising_steps(0);
    return;
  }
  if (s.blocks_done == st.steps_decided_at || s.steps_last_block <= 0 || s.ms_last_block <= 0) return;
  st.steps_decided_at = s.blocks_done;
  const double block_ms = 1000.0 * s.frames_per_block * kFpsD / kFpsN;
  const double per_step = s.ms_last_block / s.steps_last_block;
  const bool piled_up = s.frames_pending > 2 * s.frames_per_block;
  int steps = s.steps;
  if (per_step * steps > 0.95 * block_ms || piled_up)
    steps = std::max(1, std::min(steps - 1, static_cast<int>(0.85 * block_ms / per_step)));
  else if (steps < s.steps_full && per_step * (steps + 1) <= 0.8 * block_ms && !piled_up)
    steps += 1;
  if (steps == s.steps) return;
  GST_INFO_OBJECT(self, "lag-policy=degrade: %d of %d denoising steps from now on (last block %.0f ms with %d, "
                  "%" G_GINT64_FORMAT " frames pending)", steps, s.steps_full, s.ms_last_block, s.steps_last_block,
                  s.frames_pending);
  st.engine->set_denoising_steps(steps == s.steps_full ? 0 : steps);
}

// Every stats-interval ms: an element message "liveavatar-stats" with what the element and the model are doing.
static void maybe_post_stats(GstLiveAvatar* self) {
  GstLiveAvatarPrivate* priv = self->priv;
  State& st = priv->state;
  GST_OBJECT_LOCK(self);
  const guint interval_ms = priv->settings.stats_interval;
  const guint64 processed = priv->qos_processed, replaced = priv->qos_dropped;
  GST_OBJECT_UNLOCK(self);
  if (interval_ms == 0 || !st.engine) return;
  const gint64 now = g_get_monotonic_time();
  if (st.stats_at_us == 0) {
    st.stats_at_us = now;
    st.stats_frames = st.frames_out;
    return;
  }
  if (now - st.stats_at_us < static_cast<gint64>(interval_ms) * 1000) return;
  const double fps = (st.frames_out - st.stats_frames) * 1e6 / static_cast<double>(now - st.stats_at_us);
  st.stats_at_us = now;
  st.stats_frames = st.frames_out;
  const liveavatar::EngineStats s = st.engine->stats();
  const GstClockTime total = gst_aggregator_get_latency(GST_AGGREGATOR(self));
  GstStructure* info = gst_structure_new(
      "liveavatar-stats", "fps", G_TYPE_DOUBLE, fps, "frames", G_TYPE_INT64, st.frames_out, "latency",
      G_TYPE_UINT64, priv->own_latency.load(), "pipeline-latency", G_TYPE_UINT64,
      GST_CLOCK_TIME_IS_VALID(total) ? total : 0, "frames-queued", G_TYPE_INT64, s.frames_queued, "frames-pending",
      G_TYPE_INT64, s.frames_pending, "ms-per-block", G_TYPE_DOUBLE, s.ms_per_block, "denoising-steps", G_TYPE_INT,
      s.steps, "denoising-steps-full", G_TYPE_INT, s.steps_full, "blocks-degraded", G_TYPE_INT64, s.blocks_degraded,
      "processed", G_TYPE_UINT64, processed, "replaced", G_TYPE_UINT64, replaced, nullptr);
  if (st.vad)
    gst_structure_set(info, "speaking", G_TYPE_BOOLEAN, st.vad->speaking(), "voice-probability", G_TYPE_DOUBLE,
                      static_cast<double>(st.vad->probability()), "vad", G_TYPE_STRING, st.vad->kind().c_str(),
                      "audio-time", G_TYPE_UINT64, gst_util_uint64_scale(st.vad->samples(), GST_SECOND, kRate),
                      nullptr);
  gst_element_post_message(GST_ELEMENT(self), gst_message_new_element(GST_OBJECT(self), info));
}

// ---------------------------------------------------------------------------------------------------------------
// Virtual methods

static GstFlowReturn gst_live_avatar_aggregate_impl(GstLiveAvatar* self, gboolean timeout) {
  GstLiveAvatarPrivate* priv = self->priv;
  State& st = priv->state;

  // Live when a live source is upstream: the aggregator then reports a latency and waits on the clock.
  priv->live = GST_CLOCK_TIME_IS_VALID(gst_aggregator_get_latency(GST_AGGREGATOR(self)));
  if (priv->need_reset.exchange(false)) {
    GST_DEBUG_OBJECT(self, "flushed: new audio stream");
    st.clear_stream();
    st.have_segment = false;
  }
  if (st.finished) return GST_FLOW_EOS;
  if (!st.engine) {
    GstFlowReturn ret;
    if (!take_loaded_engine(self, &ret)) return ret;
  }

  if (!consume_images(self)) return GST_FLOW_ERROR;

  const bool image_eos = gst_aggregator_pad_is_eos(self->image_pad);
  if (!st.have_reference) {
    if (image_eos) {
      GST_ELEMENT_ERROR(self, STREAM, FAILED,
                        ("The image pad ended without a picture: the avatar needs a portrait before the audio."),
                        ("link a still image, e.g. filesrc location=face.png ! pngdec ! videoconvert ! la.image"));
      return GST_FLOW_ERROR;
    }
    // Live audio before any picture: nothing to animate yet; drop it rather than build up latency.
    GstBuffer* a = gst_aggregator_pad_pop_buffer(self->audio_pad);
    if (a) {
      if (!st.warned_no_image) {
        GST_ELEMENT_WARNING(self, STREAM, FAILED, ("Audio arrived before the portrait; waiting for the image pad."),
                            (nullptr));
        st.warned_no_image = true;
      }
      gst_buffer_unref(a);
    } else if (gst_aggregator_pad_is_eos(self->audio_pad)) {
      GST_ELEMENT_ERROR(self, STREAM, FAILED, ("The audio ended before any portrait arrived on the image pad."),
                        ("link a still image to the image pad"));
      return GST_FLOW_ERROR;
    }
    return GST_FLOW_OK;
  }

  sync_segment(self);
  // Live, lag-policy=wait, a model far behind: leave the audio in the pad's (bounded) queue for now.
  const liveavatar::EngineStats stats = st.engine->stats();
  const bool backlog = priv->live && stats.threaded && stats.frames_pending > kMaxPendingFrames &&
                       lag_policy(self) == GST_LIVE_AVATAR_LAG_POLICY_WAIT;
  GstBuffer* buf = backlog ? nullptr : gst_aggregator_pad_pop_buffer(self->audio_pad);
  if (buf) {
    if (st.segment_done) {
      // Audio after a SEGMENT_DONE (a looping segment seek): a new timeline from the new segment's start.
      GST_DEBUG_OBJECT(self, "new segment after segment-done");
      st.clear_stream();
    }
    feed_audio(self, buf);
    gst_buffer_unref(buf);
  } else if (st.segment_done) {
    // The segment's frames are all out; wait for the next segment.
  } else if (backlog) {
    // The audio stays queued; drain_frames below blocks until the model has caught up a little.
  } else if (timeout && priv->live && GST_CLOCK_TIME_IS_VALID(st.origin_rt)) {
    // Live and the audio for the next frame is late: idle through that frame with silence. So is audio whose end
    // plus the upstream latency has passed (a block model takes its audio long before the frames are due).
    gint64 want = gst_util_uint64_scale(st.frames_out + 1, static_cast<guint64>(kRate) * kFpsD, kFpsN);
    const GstClockTime now = running_time_now(self);
    const GstClockTime total = gst_aggregator_get_latency(GST_AGGREGATOR(self));
    const GstClockTime own = priv->own_latency.load();
    const GstClockTime upstream = GST_CLOCK_TIME_IS_VALID(total) && total > own ? total - own : 0;
    if (GST_CLOCK_TIME_IS_VALID(now) && now > st.origin_rt + upstream) {
      const gint64 overdue_frames = static_cast<gint64>((now - st.origin_rt - upstream) / kFrameDuration);
      want = std::max<gint64>(
          want, static_cast<gint64>(gst_util_uint64_scale(overdue_frames, static_cast<guint64>(kRate) * kFpsD, kFpsN)));
    }
    const gint64 have = st.engine->samples_pushed();
    if (want > have) {
      GST_LOG_OBJECT(self, "audio late: idling frame %" G_GINT64_FORMAT, st.frames_out);
      push_silence(st, static_cast<size_t>(want - have));
    }
  } else if (timeout && priv->live && !GST_CLOCK_TIME_IS_VALID(st.origin_rt)) {
    // Live with a portrait but no audio yet: start the clock now so the avatar idles.
    GstClock* clock = gst_element_get_clock(GST_ELEMENT(self));
    if (clock) {
      const GstClockTime now = gst_clock_get_time(clock) - gst_element_get_base_time(GST_ELEMENT(self));
      gst_object_unref(clock);
      const GstClockTime lat = gst_aggregator_get_latency(GST_AGGREGATOR(self));
      st.origin_rt = now > lat && GST_CLOCK_TIME_IS_VALID(lat) ? now - lat : 0;
      if (!st.have_segment) {
        GstSegment seg;
        gst_segment_init(&seg, GST_FORMAT_TIME);
        st.audio_segment = seg;
        st.have_segment = true;
        gst_aggregator_update_segment(GST_AGGREGATOR(self), &seg);
      }
    }
  }

  bool waiting = false;
  GstFlowReturn ret = drain_frames(self, &waiting, /*at_end=*/false, backlog);
  if (priv->live) update_latency(self);  // not live, nobody waits on it: no LATENCY messages to redistribute
  adapt_steps(self, lag_policy(self));
  maybe_post_stats(self);
  if (ret != GST_FLOW_OK || waiting) return ret;

  if (gst_aggregator_pad_is_eos(self->audio_pad) && !gst_aggregator_pad_has_buffer(self->audio_pad)) {
    ret = finish_audio(self, &waiting);
    if (ret != GST_FLOW_OK || waiting) return ret;
    st.finished = true;
    GST_INFO_OBJECT(self, "audio ended: %" G_GINT64_FORMAT " frames", st.frames_out);
    return GST_FLOW_EOS;
  }
  return GST_FLOW_OK;
}

static GstFlowReturn gst_live_avatar_aggregate(GstAggregator* agg, gboolean timeout) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(agg);
  try {
    return gst_live_avatar_aggregate_impl(self, timeout);
  } catch (const liveavatar::Cancelled&) {
    // A flush or PAUSED->READY asked the engine to stop; what follows (flush: reset on FLUSH_STOP; stop) cleans up.
    // Returning FLUSHING here would make GstAggregator flush every sink pad when only the audio pad flushes.
    GST_DEBUG_OBJECT(self, "engine work cancelled (flush or stop)");
    return GST_FLOW_OK;
  } catch (...) {
    post_current_exception(self, /*loading=*/false);
  }
  return GST_FLOW_ERROR;
}

static GstFlowReturn gst_live_avatar_update_src_caps(GstAggregator* agg, GstCaps* downstream, GstCaps** ret) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(agg);
  State& st = self->priv->state;
  if (!st.engine || !st.have_reference) return GST_AGGREGATOR_FLOW_NEED_DATA;  // size unknown yet
  int w, h;
  GST_OBJECT_LOCK(self);
  w = self->priv->settings.width;
  h = self->priv->settings.height;
  GST_OBJECT_UNLOCK(self);
  GstCaps* caps = gst_caps_copy(downstream);
  if (w > 0 && h > 0) {
    GstCaps* fixed = gst_caps_new_simple("video/x-raw", "width", G_TYPE_INT, w, "height", G_TYPE_INT, h, nullptr);
    GstCaps* both = gst_caps_intersect(caps, fixed);
    gst_caps_unref(caps);
    gst_caps_unref(fixed);
    caps = both;
  }
  if (gst_caps_is_empty(caps)) {
    gst_caps_unref(caps);
    GST_ELEMENT_ERROR(self, CORE, NEGOTIATION, ("Downstream refuses %dx%d video.", w, h),
                      ("put videoscale after liveavatar or change the width/height properties"));
    return GST_FLOW_NOT_NEGOTIATED;
  }
  *ret = caps;
  return GST_FLOW_OK;
}

static GstCaps* gst_live_avatar_fixate_src_caps(GstAggregator* agg, GstCaps* caps) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(agg);
  const liveavatar::Size want = self->priv->state.engine->output_size();
  caps = gst_caps_make_writable(caps);
  caps = gst_caps_truncate(caps);
  GstStructure* s = gst_caps_get_structure(caps, 0);
  gst_structure_fixate_field_string(s, "format", "RGB");
  gst_structure_fixate_field_nearest_int(s, "width", want.width);
  gst_structure_fixate_field_nearest_int(s, "height", want.height);
  gst_structure_fixate_field_nearest_fraction(s, "framerate", kFpsN, kFpsD);
  gst_structure_fixate_field_nearest_fraction(s, "pixel-aspect-ratio", 1, 1);
  return gst_caps_fixate(caps);
}

static gboolean gst_live_avatar_negotiated_src_caps(GstAggregator* agg, GstCaps* caps) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(agg);
  State& st = self->priv->state;
  GstVideoInfo info;
  if (!gst_video_info_from_caps(&info, caps)) return FALSE;
  try {
    st.engine->set_output_size({GST_VIDEO_INFO_WIDTH(&info), GST_VIDEO_INFO_HEIGHT(&info)});
  } catch (const liveavatar::Error& e) {
    GST_ELEMENT_ERROR(self, CORE, NEGOTIATION, ("%s", e.what()), ("caps %" GST_PTR_FORMAT, caps));
    return FALSE;
  } catch (...) {
    post_current_exception(self, /*loading=*/false);
    return FALSE;
  }
  if (st.stand_in) {
    try {
      st.stand_in->set_output_size({GST_VIDEO_INFO_WIDTH(&info), GST_VIDEO_INFO_HEIGHT(&info)});
    } catch (...) {
      st.stand_in.reset();  // made again at the new size when needed
    }
  }
  st.out_info = info;
  st.out_negotiated = true;
  if (st.to_i420) {
    gst_video_converter_free(st.to_i420);
    st.to_i420 = nullptr;
  }
  GST_INFO_OBJECT(self, "output caps %" GST_PTR_FORMAT, caps);
  return GST_AGGREGATOR_CLASS(gst_live_avatar_parent_class)->negotiated_src_caps(agg, caps);
}

// Called with the aggregator's SRC_LOCK held: must not call back into GstAggregator API that takes it.
static GstClockTime gst_live_avatar_get_next_time(GstAggregator* agg) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(agg);
  const State& st = self->priv->state;
  if (!GST_CLOCK_TIME_IS_VALID(st.origin_rt)) {
    // No audio yet. With a portrait waiting, ask to be woken at once: a live pipeline then starts idling without
    // audio (a non-live one ignores the time and waits for data as usual).
    const bool picture = st.have_reference || gst_aggregator_pad_has_buffer(self->image_pad);
    return picture ? 0 : GST_CLOCK_TIME_NONE;
  }
  // The next frame is due at its start + the latency (which the aggregator adds). The audio of the first frame not
  // complete is overdue at its end + the upstream latency, = (its end - our own latency) + the latency: then the
  // idle fill supplies silence. With a block model that comes long before the frame is due.
  const GstClockTime next_frame = frame_start_rt(st, st.frames_out);
  if (!st.engine) return next_frame;
  const gint64 audio_frame = st.engine->samples_pushed() / st.engine->samples_per_frame();
  const GstClockTime audio_end = frame_start_rt(st, audio_frame + 1);
  const GstClockTime own = self->priv->own_latency.load();
  const GstClockTime audio_due = audio_end > own ? audio_end - own : 0;
  return st.stalled ? audio_due : std::min(next_frame, audio_due);
}

// Serialized events arrive here on the aggregate thread, in order with the buffers; FLUSH_* on the upstream thread.
// Timing is in running time of forward TIME segments. Anything else is refused here, in the upstream thread before
// GstAggregator queues it: its own segment handling trips GLib criticals on such segments (found by
// tests/fuzz/element_fuzzer.cpp).
static GstFlowReturn gst_live_avatar_sink_event_pre_queue(GstAggregator* agg, GstAggregatorPad* pad, GstEvent* event) {
  if (GST_EVENT_TYPE(event) == GST_EVENT_SEGMENT) {
    const GstSegment* seg = nullptr;
    gst_event_parse_segment(event, &seg);
    if (seg->format != GST_FORMAT_TIME || seg->rate <= 0) {
      GST_ELEMENT_ERROR(agg, STREAM, FORMAT,
                        ("The %s pad needs a forward segment in time, got one in %s at rate %g.", GST_PAD_NAME(pad),
                         gst_format_get_name(seg->format), seg->rate),
                        ("reverse playback and segments in bytes or samples are not supported"));
      gst_event_unref(event);
      return GST_FLOW_ERROR;
    }
  }
  return GST_AGGREGATOR_CLASS(gst_live_avatar_parent_class)->sink_event_pre_queue(agg, pad, event);
}

static gboolean gst_live_avatar_sink_event(GstAggregator* agg, GstAggregatorPad* pad, GstEvent* event) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(agg);
  if (GST_EVENT_TYPE(event) == GST_EVENT_GAP) {
    // A GAP with no segment in force (none yet, or none since a flush) has no time to be in; GstAggregator would
    // clip it against the undefined segment (a GLib critical, found by tests/fuzz/element_fuzzer.cpp). Dropped.
    GST_OBJECT_LOCK(pad);
    const bool timed = pad->segment.format == GST_FORMAT_TIME;
    GST_OBJECT_UNLOCK(pad);
    if (!timed) {
      GST_WARNING_OBJECT(pad, "GAP event outside any segment: dropped");
      gst_event_unref(event);
      return TRUE;
    }
  }
  if (pad == self->audio_pad && GST_EVENT_TYPE(event) == GST_EVENT_FLUSH_START && self->priv->state.engine)
    self->priv->state.engine->cancel();  // a block in progress stops at the next block boundary
  if (pad == self->audio_pad && GST_EVENT_TYPE(event) == GST_EVENT_FLUSH_STOP) self->priv->need_reset = true;
  if (pad == self->image_pad && GST_EVENT_TYPE(event) == GST_EVENT_FLUSH_STOP)
    self->priv->image_flush_seqnum = gst_event_get_seqnum(event);
  if (pad == self->image_pad && GST_EVENT_TYPE(event) == GST_EVENT_SEGMENT_DONE) {
    // imagefreeze ends a segment seek too; the audio's SEGMENT_DONE, after the last frame, is the one that goes on.
    gst_event_unref(event);
    return TRUE;
  }
  if (pad == self->audio_pad && GST_EVENT_TYPE(event) == GST_EVENT_SEGMENT_DONE) {
    // End of a segment seek: the audio up to the segment's stop is all here. Push the partial last frame before the
    // event goes downstream, so the segment's video is exactly as long as its audio.
    State& st = self->priv->state;
    if (st.engine && st.have_reference && GST_CLOCK_TIME_IS_VALID(st.origin_rt) && !st.segment_done) {
      GstFlowReturn ret = GST_FLOW_ERROR;
      try {
        ret = finish_audio(self);
      } catch (const liveavatar::Cancelled&) {
        ret = GST_FLOW_FLUSHING;
      } catch (...) {
        post_current_exception(self, /*loading=*/false);
      }
      st.segment_done = true;
      GST_INFO_OBJECT(self, "segment done after %" G_GINT64_FORMAT " frames (%s)", st.frames_out,
                      gst_flow_get_name(ret));
    }
  }
  if (pad == self->audio_pad && GST_EVENT_TYPE(event) == GST_EVENT_EOS && !self->priv->state.have_reference &&
      !gst_pad_is_linked(GST_PAD(self->image_pad))) {
    GST_ELEMENT_ERROR(self, CORE, PAD, ("The image pad is not linked: the avatar needs a portrait."),
                      ("link a still image, e.g. filesrc location=face.png ! pngdec ! videoconvert ! la.image"));
  }
  return GST_AGGREGATOR_CLASS(gst_live_avatar_parent_class)->sink_event(agg, pad, event);
}

// The image branch did not flush for a flushing seek (a still-picture decoder refuses seeks). GstAggregator restarts
// its output only once every sink pad has flushed with the seek's seqnum, so the image pad is flushed here, and what
// it held is put back: its segment, a picture not taken yet, and EOS. The picture shown so far stays the reference;
// an image stream that cannot seek ends at its current picture, since its source may have stopped on the flush.
static void flush_image_pad_for_seek(GstLiveAvatar* self, guint32 seqnum) {
  GstPad* pad = GST_PAD(self->image_pad);
  const bool eos = GST_PAD_IS_EOS(pad) || !gst_pad_is_linked(pad);
  GstEvent* segment = gst_pad_get_sticky_event(pad, GST_EVENT_SEGMENT, 0);
  GstBuffer* pending = gst_aggregator_pad_peek_buffer(self->image_pad);
  GST_DEBUG_OBJECT(self, "image branch did not flush for seek %u: flushing the image pad (eos %d, picture %p)", seqnum,
                   eos, pending);
  GstEvent* e = gst_event_new_flush_start();
  gst_event_set_seqnum(e, seqnum);
  gst_pad_send_event(pad, e);
  e = gst_event_new_flush_stop(TRUE);
  gst_event_set_seqnum(e, seqnum);
  gst_pad_send_event(pad, e);
  if (segment) gst_pad_send_event(pad, segment);
  if (pending) gst_pad_chain(pad, pending);
  if (!eos)
    GST_ELEMENT_WARNING(self, STREAM, FAILED,
                        ("The image branch cannot seek: the current picture is kept for the rest of the stream."),
                        ("put imagefreeze in the image branch to keep a seekable still picture"));
  gst_pad_send_event(pad, gst_event_new_eos());
}

// Seeks go to the audio branch, which defines the timeline. A flushing seek first reaches the image branch, which
// either flushes itself (imagefreeze: the picture restarts at the new position) or is flushed here (a still-picture
// decoder), so that GstAggregator sees both pads flush and restarts the output. A non-flushing seek (looping a
// segment) only concerns the audio. A seek the audio cannot do fails without flushing anything, and playback goes on.
static gboolean handle_seek(GstLiveAvatar* self, GstEvent* event) {
  GstLiveAvatarPrivate* priv = self->priv;
  gdouble rate;
  GstFormat format;
  GstSeekFlags flags;
  GstSeekType start_type, stop_type;
  gint64 start, stop;
  gst_event_parse_seek(event, &rate, &format, &flags, &start_type, &start, &stop_type, &stop);
  const guint32 seqnum = gst_event_get_seqnum(event);
  if (priv->last_seek_seqnum.exchange(seqnum) == seqnum) {
    GST_DEBUG_OBJECT(self, "seek %u already handled (sent by another sink)", seqnum);
    gst_event_unref(event);
    return priv->last_seek_result.load();
  }
  priv->last_seek_result = false;
  if (format != GST_FORMAT_TIME || rate <= 0) {
    GST_INFO_OBJECT(self, "refusing a seek in %s at rate %g: only forward seeks in time are possible",
                    gst_format_get_name(format), rate);
    gst_event_unref(event);
    return FALSE;
  }
  GstQuery* query = gst_query_new_seeking(GST_FORMAT_TIME);
  gboolean seekable = TRUE;  // unknown: try
  if (gst_pad_peer_query(GST_PAD(self->audio_pad), query))
    gst_query_parse_seeking(query, nullptr, &seekable, nullptr, nullptr);
  gst_query_unref(query);
  if (!seekable) {
    GST_INFO_OBJECT(self, "the audio branch cannot seek: seek refused");
    gst_event_unref(event);
    return FALSE;
  }
  if (flags & GST_SEEK_FLAG_FLUSH) {
    // The image branch first, flushed here when it does not flush itself. It gets the seek without an end: the audio
    // ends the segment; an image branch that ended it too (SEGMENT_DONE, no EOS, e.g. decodebin's pngparse) would
    // leave the image pad waiting for data forever.
    GstEvent* image_seek = gst_event_new_seek(rate, format, static_cast<GstSeekFlags>(flags & ~GST_SEEK_FLAG_SEGMENT),
                                              start_type, start, GST_SEEK_TYPE_SET, -1);
    gst_event_set_seqnum(image_seek, seqnum);
    gst_pad_push_event(GST_PAD(self->image_pad), image_seek);
    if (priv->image_flush_seqnum.load() != seqnum) flush_image_pad_for_seek(self, seqnum);
  }
  const gboolean ok = gst_pad_push_event(GST_PAD(self->audio_pad), event);
  priv->last_seek_result = ok;
  GST_INFO_OBJECT(self, "seek %u %s", seqnum, ok ? "done" : "refused by the audio branch");
  return ok;
}

static gboolean gst_live_avatar_src_event(GstAggregator* agg, GstEvent* event) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(agg);
  if (GST_EVENT_TYPE(event) == GST_EVENT_SEEK) return handle_seek(self, event);
  if (GST_EVENT_TYPE(event) == GST_EVENT_QOS) {
    GstQOSType type;
    gdouble proportion;
    GstClockTimeDiff diff;
    GstClockTime timestamp;
    gst_event_parse_qos(event, &type, &proportion, &diff, &timestamp);
    GST_OBJECT_LOCK(self);
    // As GstBaseTransform does: a late buffer means the next ones should end after timestamp + 2 * lateness.
    if (diff > 0)
      self->priv->qos_earliest = timestamp + 2 * diff;
    else
      self->priv->qos_earliest = timestamp + diff;
    GST_OBJECT_UNLOCK(self);
  }
  return GST_AGGREGATOR_CLASS(gst_live_avatar_parent_class)->src_event(agg, event);
}

static void reset_qos(GstLiveAvatar* self) {
  GST_OBJECT_LOCK(self);
  self->priv->qos_earliest = GST_CLOCK_TIME_NONE;
  self->priv->qos_processed = self->priv->qos_late = 0;
  GST_OBJECT_UNLOCK(self);
}

// The video lasts as long as the audio: the duration comes from the audio branch (the image branch, a still picture or
// imagefreeze, has none or an endless one).
static gboolean gst_live_avatar_src_query(GstAggregator* agg, GstQuery* query) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(agg);
  if (GST_QUERY_TYPE(query) == GST_QUERY_DURATION) {
    GstFormat format;
    gst_query_parse_duration(query, &format, nullptr);
    if (format == GST_FORMAT_TIME) return gst_pad_peer_query(GST_PAD(self->audio_pad), query);
  }
  return GST_AGGREGATOR_CLASS(gst_live_avatar_parent_class)->src_query(agg, query);
}

// Caps a sink pad refuses fail upstream as a bare "not-negotiated"; say here what to put in front instead.
static gboolean gst_live_avatar_sink_query(GstAggregator* agg, GstAggregatorPad* pad, GstQuery* query) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(agg);
  gboolean ret = GST_AGGREGATOR_CLASS(gst_live_avatar_parent_class)->sink_query(agg, pad, query);
  if (GST_QUERY_TYPE(query) == GST_QUERY_ACCEPT_CAPS) {
    gboolean accepted = FALSE;
    GstCaps* caps = nullptr;
    gst_query_parse_accept_caps(query, &caps);
    gst_query_parse_accept_caps_result(query, &accepted);
    if (!accepted) {
      gchar* text = gst_caps_to_string(caps);
      if (pad == self->audio_pad)
        GST_ELEMENT_WARNING(self, CORE, NEGOTIATION,
                            ("The audio pad needs F32LE mono 16000 Hz audio; put audioconvert ! audioresample in "
                             "front of it."),
                            ("refused caps %s", text));
      else
        GST_ELEMENT_WARNING(self, CORE, NEGOTIATION,
                            ("The image pad needs raw video (RGB, GRAY8, I420, ...); put videoconvert in front of it."),
                            ("refused caps %s", text));
      g_free(text);
    }
  }
  return ret;
}

// PAUSED->READY joins the streaming thread: make a long neural block give up first.
static GstStateChangeReturn gst_live_avatar_change_state(GstElement* element, GstStateChange transition) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(element);
  if (transition == GST_STATE_CHANGE_PAUSED_TO_READY && self->priv->state.engine) self->priv->state.engine->cancel();
  if (transition == GST_STATE_CHANGE_PAUSED_TO_READY && self->priv->loader) self->priv->loader->cancel = true;
  return GST_ELEMENT_CLASS(gst_live_avatar_parent_class)->change_state(element, transition);
}

// Called once every sink pad has flushed (a flushing seek). GstAggregator has no flush of its own to chain up to.
static GstFlowReturn gst_live_avatar_flush(GstAggregator* agg) {
  GST_LIVE_AVATAR(agg)->priv->need_reset = true;
  reset_qos(GST_LIVE_AVATAR(agg));
  return GST_FLOW_OK;
}

static Settings snapshot_settings(GstLiveAvatar* self) {
  GST_OBJECT_LOCK(self);
  try {
    Settings s = self->priv->settings;
    GST_OBJECT_UNLOCK(self);
    return s;
  } catch (...) {
    GST_OBJECT_UNLOCK(self);
    throw;
  }
}

// After an engine was made or reused: its warnings (e.g. a model folder without the LiveAvatar LoRA) and the end of
// the load.
static void engine_ready(GstLiveAvatar* self) {
  post_engine_warnings(self);
  post_plan(self, *self->priv->state.engine);
  gst_element_post_message(GST_ELEMENT(self), gst_message_new_progress(GST_OBJECT(self), GST_PROGRESS_TYPE_COMPLETE,
                                                                       "load", "Avatar backend ready"));
}

// Worker: a PROGRESS message (CONTINUE) when the file or the percentage changes, with the fields "file",
// "files-done", "files-total", "bytes-done", "bytes-total" and "percent". Throws Cancelled once the load is cancelled.
static void on_load_progress(GstLiveAvatar* self, Loader* l, int delay_ms, const liveavatar::LoadProgress& p) {
  if (l->cancel) throw liveavatar::Cancelled();
  const int percent = p.bytes_total ? static_cast<int>(100 * p.bytes_done / p.bytes_total) : 0;
  if (percent != l->last_percent || p.files_done != l->last_file) {
    l->last_percent = percent;
    l->last_file = p.files_done;
    gchar* text = p.file.empty() ? g_strdup_printf("Loaded the model (%d%%)", percent)
                                 : g_strdup_printf("Loading %s (%d%%)", p.file.c_str(), percent);
    GstMessage* m = gst_message_new_progress(GST_OBJECT(self), GST_PROGRESS_TYPE_CONTINUE, "load", text);
    g_free(text);
    gst_structure_set(gst_message_writable_structure(m), "file", G_TYPE_STRING, p.file.c_str(), "files-done",
                      G_TYPE_INT, p.files_done, "files-total", G_TYPE_INT, p.files_total, "bytes-done", G_TYPE_UINT64,
                      static_cast<guint64>(p.bytes_done), "bytes-total", G_TYPE_UINT64,
                      static_cast<guint64>(p.bytes_total), "percent", G_TYPE_INT, percent, nullptr);
    gst_element_post_message(GST_ELEMENT(self), m);
  }
  // Tests only: a slow disk (object data, no property reaches it).
  for (int waited = 0; waited < delay_ms; waited += 5) {
    if (l->cancel) throw liveavatar::Cancelled();
    g_usleep(5000);
  }
}

// Starts loading the model on a worker; the aggregate thread takes it (take_loaded_engine).
static void start_loader(GstLiveAvatar* self, liveavatar::EngineConfig config, const std::string& key) {
  auto l = std::make_unique<Loader>();
  Loader* raw = l.get();
  raw->key = key;
  const int delay_ms = GPOINTER_TO_INT(g_object_get_data(G_OBJECT(self), "liveavatar-testing-load-delay-ms"));
  config.on_load_progress = [self, raw, delay_ms](const liveavatar::LoadProgress& p) {
    on_load_progress(self, raw, delay_ms, p);
  };
  // The outcome is posted from here, so it is known without data flowing (a pipeline waiting in PAUSED); the
  // aggregate thread takes the engine when it needs it.
  raw->thread = std::thread([self, raw, config] {
    std::unique_ptr<liveavatar::Engine> engine;
    std::exception_ptr error;
    try {
      engine = liveavatar::Engine::create(config);
      for (const auto& w : engine->take_warnings())  // e.g. a model folder without the LiveAvatar LoRA
        GST_ELEMENT_WARNING(self, STREAM, FAILED, ("%s", w.c_str()), (nullptr));
      post_plan(self, *engine);
      gst_element_post_message(GST_ELEMENT(self),
                               gst_message_new_progress(GST_OBJECT(self), GST_PROGRESS_TYPE_COMPLETE, "load",
                                                        "Avatar backend ready"));
    } catch (const liveavatar::Cancelled&) {
      error = std::current_exception();  // going to READY/NULL: nothing to report
    } catch (...) {
      error = std::current_exception();
      gst_element_post_message(GST_ELEMENT(self), gst_message_new_progress(GST_OBJECT(self),
                                                                           GST_PROGRESS_TYPE_ERROR, "load",
                                                                           "Loading failed"));
      post_current_exception(self, /*loading=*/true);
    }
    std::lock_guard<std::mutex> lock(raw->mu);
    raw->engine = std::move(engine);
    raw->error = error;
    raw->done = true;
    raw->cv.notify_all();
  });
  GST_INFO_OBJECT(self, "loading the model on a worker");
  self->priv->loader = std::move(l);
}

// Aggregate thread, while the model loads: waits a little for it. True once the engine is there; false with *ret set
// (GST_FLOW_OK: still loading, called again; GST_FLOW_ERROR: the load failed, an element error posted).
static bool take_loaded_engine(GstLiveAvatar* self, GstFlowReturn* ret) {
  GstLiveAvatarPrivate* priv = self->priv;
  Loader* l = priv->loader.get();
  *ret = GST_FLOW_ERROR;
  if (!l) {
    GST_ELEMENT_ERROR(self, CORE, STATE_CHANGE, ("The avatar backend is not loaded."), ("no engine and no loader"));
    return false;
  }
  {
    std::unique_lock<std::mutex> lock(l->mu);
    if (!l->cv.wait_for(lock, std::chrono::milliseconds(100), [&] { return l->done; })) {
      *ret = GST_FLOW_OK;
      return false;
    }
  }
  l->thread.join();
  if (l->error) {  // posted by the loader
    priv->loader.reset();
    return false;
  }
  priv->state.engine = std::move(l->engine);
  priv->state.engine_key = l->key;
  priv->loader.reset();
  update_latency(self, /*force=*/true);
  GST_INFO_OBJECT(self, "model loaded");
  return true;
}

static gboolean start_impl(GstLiveAvatar* self) {
  GstLiveAvatarPrivate* priv = self->priv;
  const Settings settings = snapshot_settings(self);

  liveavatar::EngineConfig config;
  config.backend = settings.backend == GST_LIVE_AVATAR_BACKEND_LIVEAVATAR ? "liveavatar" : "puppet";
  config.model_dir = settings.model_dir;
  config.lora = settings.lora;
  config.prompt = settings.prompt;
  config.precision = settings.precision == GST_LIVE_AVATAR_PRECISION_BF16  ? "bf16"
                     : settings.precision == GST_LIVE_AVATAR_PRECISION_FP8 ? "fp8"
                                                                           : "fp32";
  static const char* const kParallel[] = {"auto", "single", "step", "stage"};
  static const char* const kKv[] = {"auto", "fp32", "bf16", "fp8"};
  config.parallel = kParallel[settings.parallel];
  config.devices = settings.devices;
  config.kv_precision = kKv[settings.kv_precision];
  config.rendezvous = settings.rendezvous;
  config.parallel_timeout_ms = static_cast<int>(settings.parallel_timeout);
  config.width = settings.width;
  config.height = settings.height;
  config.seed = settings.seed;
  config.fps_n = kFpsN;
  config.fps_d = kFpsD;
  config.sample_rate = kRate;
  config.max_area = settings.max_area;
  // Tests only: object data (not a property: neither gst-inspect nor gst-launch reach it) makes the puppet a slow
  // block model, to test the lag policies without model weights.
  config.testing_block_delay_ms =
      GPOINTER_TO_INT(g_object_get_data(G_OBJECT(self), "liveavatar-testing-block-delay-ms"));
  config.testing_slow_blocks = GPOINTER_TO_INT(g_object_get_data(G_OBJECT(self), "liveavatar-testing-slow-blocks"));
  if (const auto* fault = static_cast<const char*>(g_object_get_data(G_OBJECT(self), "liveavatar-testing-fault")))
    config.testing_fault = fault;  // tests only, the same way: the backend fails on purpose (tests/hardening)
  if (!parse_mouth_box(settings.mouth_box, &config.mouth_box)) {
    GST_ELEMENT_ERROR(self, RESOURCE, SETTINGS, ("mouth-box \"%s\" is not x,y,width,height.",
                                                  settings.mouth_box.c_str()),
                      ("example: mouth-box=200,300,80,30 (pixels of the portrait)"));
    return FALSE;
  }
  if ((settings.width == 0) != (settings.height == 0)) {
    GST_ELEMENT_ERROR(self, RESOURCE, SETTINGS, ("Set both width and height, or neither."), (nullptr));
    return FALSE;
  }
  // Loading the neural model takes long: an engine made with the same settings is kept from the last run.
  const std::string key = config.backend + "|" + std::to_string(config.width) + "x" + std::to_string(config.height) +
                          "|" + std::to_string(config.seed) + "|" + settings.mouth_box + "|" + config.model_dir +
                          "|" + config.lora + "|" + config.prompt + "|" + config.precision + "|" +
                          std::to_string(config.max_area) + "|" + std::to_string(config.testing_block_delay_ms) +
                          "|" + config.parallel + "|" + config.devices + "|" + config.kv_precision + "|" +
                          config.rendezvous + "|" + std::to_string(config.parallel_timeout_ms) + "|" +
                          std::to_string(config.testing_slow_blocks) + "|" +
                          config.testing_fault;
  GstMessage* msg = gst_message_new_progress(GST_OBJECT(self), GST_PROGRESS_TYPE_START, "load",
                                             "Loading the avatar backend");
  gst_element_post_message(GST_ELEMENT(self), msg);
  priv->loader.reset();
  bool loading = false;
  try {
    if (priv->state.engine && priv->state.engine_key == key) {
      GST_INFO_OBJECT(self, "reusing the loaded engine");
      priv->state.engine->set_output_size({config.width, config.height});  // forget the last negotiated size
    } else if (config.backend == "puppet") {
      priv->state.engine.reset();  // nothing to load: made here
      priv->state.engine = liveavatar::Engine::create(config);
      priv->state.engine_key = key;
    } else {
      priv->state.engine.reset();  // its memory is given back before the new model loads
      start_loader(self, config, key);
      loading = true;
    }
  } catch (...) {
    gst_element_post_message(GST_ELEMENT(self), gst_message_new_progress(GST_OBJECT(self), GST_PROGRESS_TYPE_ERROR,
                                                                         "load", "Loading failed"));
    throw;
  }
  if (!loading) engine_ready(self);
  priv->state.have_reference = false;
  priv->state.out_negotiated = false;
  priv->state.have_segment = false;
  priv->state.warned_no_image = false;
  priv->state.clear_stream();
  priv->need_reset = false;
  priv->live = false;
  reset_qos(self);
  priv->state.config = config;
  priv->state.stand_in.reset();
  // Voice activity for the stats: made again only when vad-model changes (loading the model takes a moment).
  if (!priv->state.vad || priv->state.vad_model != settings.vad_model) {
    liveavatar::VadOptions vo;
    vo.model = settings.vad_model;
    priv->state.vad = std::make_unique<liveavatar::VoiceActivity>(vo);
    priv->state.vad_model = settings.vad_model;
    if (!priv->state.vad->warning().empty())
      GST_ELEMENT_WARNING(self, RESOURCE, NOT_FOUND, ("%s", priv->state.vad->warning().c_str()), (nullptr));
  }
  priv->state.vad->reset();
  // The puppet: one frame of audio must arrive before its frame is drawn. A block model: a block, and its
  // processing once measured (0 before the first block; the figure is raised, with a LATENCY message, as it grows).
  // While the model loads: the neural model's block (12 frames) and a frame, raised once it is measured.
  priv->own_latency = 0;
  if (loading) {
    priv->own_latency = 13 * kFrameDuration;
    gst_aggregator_set_latency(GST_AGGREGATOR(self), priv->own_latency.load(), GST_CLOCK_TIME_NONE);
  } else {
    update_latency(self, /*force=*/true);
  }
  return TRUE;
}

static gboolean gst_live_avatar_start(GstAggregator* agg) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(agg);
  try {
    return start_impl(self);
  } catch (...) {
    post_current_exception(self, /*loading=*/true);
    return FALSE;
  }
}

static gboolean gst_live_avatar_stop(GstAggregator* agg) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(agg);
  State& st = self->priv->state;
  self->priv->loader.reset();  // a model still loading: cancelled at its next file or tensor, and joined
  try {
    if (st.engine) st.engine->reset();  // kept for the next start with the same settings
  } catch (...) {
    post_current_exception(self, /*loading=*/false);
    st.engine.reset();  // in an unknown state: load afresh next time
  }
  st.picture_warnings.clear();
  gst_buffer_replace(&st.last_image, nullptr);
  gst_buffer_replace(&st.last_frame, nullptr);
  st.stand_in.reset();
  if (st.to_i420) {
    gst_video_converter_free(st.to_i420);
    st.to_i420 = nullptr;
  }
  st.have_reference = false;
  st.out_negotiated = false;
  return TRUE;
}

static void gst_live_avatar_set_property(GObject* object, guint prop_id, const GValue* value, GParamSpec* pspec) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(object);
  Settings& s = self->priv->settings;
  GST_OBJECT_LOCK(self);
  switch (prop_id) {
    case PROP_BACKEND:
      s.backend = static_cast<GstLiveAvatarBackend>(g_value_get_enum(value));
      break;
    case PROP_WIDTH:
      s.width = g_value_get_int(value);
      break;
    case PROP_HEIGHT:
      s.height = g_value_get_int(value);
      break;
    case PROP_SEED:
      s.seed = g_value_get_uint64(value);
      break;
    case PROP_MOUTH_BOX: {
      const char* v = g_value_get_string(value);
      s.mouth_box = v ? v : "";
      break;
    }
    case PROP_MODEL_DIR: {
      const char* v = g_value_get_string(value);
      s.model_dir = v ? v : "";
      break;
    }
    case PROP_LORA: {
      const char* v = g_value_get_string(value);
      s.lora = v ? v : "";
      break;
    }
    case PROP_PROMPT: {
      const char* v = g_value_get_string(value);
      s.prompt = v ? v : "";
      break;
    }
    case PROP_PRECISION:
      s.precision = static_cast<GstLiveAvatarPrecision>(g_value_get_enum(value));
      break;
    case PROP_MAX_AREA:
      // It shapes the model's tensors: taken at READY->PAUSED only, so a change later would silently not apply.
      if (GST_STATE(self) > GST_STATE_READY || GST_STATE_PENDING(self) > GST_STATE_READY)
        GST_WARNING_OBJECT(self, "max-area can only be changed in the NULL or READY state");
      else
        s.max_area = g_value_get_uint(value);
      break;
    case PROP_PARALLEL:
      s.parallel = static_cast<GstLiveAvatarParallel>(g_value_get_enum(value));
      break;
    case PROP_DEVICES: {
      const char* v = g_value_get_string(value);
      s.devices = v ? v : DEFAULT_DEVICES;
      break;
    }
    case PROP_KV_PRECISION:
      s.kv_precision = static_cast<GstLiveAvatarKvPrecision>(g_value_get_enum(value));
      break;
    case PROP_RENDEZVOUS: {
      const char* v = g_value_get_string(value);
      s.rendezvous = v ? v : "";
      break;
    }
    case PROP_PARALLEL_TIMEOUT:
      s.parallel_timeout = g_value_get_uint(value);
      break;
    case PROP_LAG_POLICY:
      s.lag_policy = static_cast<GstLiveAvatarLagPolicy>(g_value_get_enum(value));
      break;
    case PROP_STATS_INTERVAL:
      s.stats_interval = g_value_get_uint(value);
      break;
    case PROP_VAD_MODEL: {
      const char* v = g_value_get_string(value);
      s.vad_model = v ? v : "";
      break;
    }
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec);
      break;
  }
  GST_OBJECT_UNLOCK(self);
}

static void gst_live_avatar_get_property(GObject* object, guint prop_id, GValue* value, GParamSpec* pspec) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(object);
  const Settings& s = self->priv->settings;
  GST_OBJECT_LOCK(self);
  switch (prop_id) {
    case PROP_BACKEND:
      g_value_set_enum(value, s.backend);
      break;
    case PROP_WIDTH:
      g_value_set_int(value, s.width);
      break;
    case PROP_HEIGHT:
      g_value_set_int(value, s.height);
      break;
    case PROP_SEED:
      g_value_set_uint64(value, s.seed);
      break;
    case PROP_MOUTH_BOX:
      g_value_set_string(value, s.mouth_box.c_str());
      break;
    case PROP_MODEL_DIR:
      g_value_set_string(value, s.model_dir.c_str());
      break;
    case PROP_LORA:
      g_value_set_string(value, s.lora.c_str());
      break;
    case PROP_PROMPT:
      g_value_set_string(value, s.prompt.c_str());
      break;
    case PROP_PRECISION:
      g_value_set_enum(value, s.precision);
      break;
    case PROP_MAX_AREA:
      g_value_set_uint(value, s.max_area);
      break;
    case PROP_LAG_POLICY:
      g_value_set_enum(value, s.lag_policy);
      break;
    case PROP_PARALLEL:
      g_value_set_enum(value, s.parallel);
      break;
    case PROP_DEVICES:
      g_value_set_string(value, s.devices.c_str());
      break;
    case PROP_KV_PRECISION:
      g_value_set_enum(value, s.kv_precision);
      break;
    case PROP_RENDEZVOUS:
      g_value_set_string(value, s.rendezvous.c_str());
      break;
    case PROP_PARALLEL_TIMEOUT:
      g_value_set_uint(value, s.parallel_timeout);
      break;
    case PROP_STATS_INTERVAL:
      g_value_set_uint(value, s.stats_interval);
      break;
    case PROP_VAD_MODEL:
      g_value_set_string(value, s.vad_model.c_str());
      break;
    default:
      G_OBJECT_WARN_INVALID_PROPERTY_ID(object, prop_id, pspec);
      break;
  }
  GST_OBJECT_UNLOCK(self);
}

static void gst_live_avatar_finalize(GObject* object) {
  GstLiveAvatar* self = GST_LIVE_AVATAR(object);
  self->priv->loader.reset();
  gst_buffer_replace(&self->priv->state.last_image, nullptr);
  gst_buffer_replace(&self->priv->state.last_frame, nullptr);
  if (self->priv->state.to_i420) gst_video_converter_free(self->priv->state.to_i420);
  delete self->priv;
  G_OBJECT_CLASS(gst_live_avatar_parent_class)->finalize(object);
}

static void gst_live_avatar_class_init(GstLiveAvatarClass* klass) {
  GObjectClass* gobject_class = G_OBJECT_CLASS(klass);
  GstElementClass* element_class = GST_ELEMENT_CLASS(klass);
  GstAggregatorClass* agg_class = GST_AGGREGATOR_CLASS(klass);

  GST_DEBUG_CATEGORY_INIT(gst_live_avatar_debug, "liveavatar", 0, "portrait + speech -> talking-head video");

  gobject_class->set_property = gst_live_avatar_set_property;
  gobject_class->get_property = gst_live_avatar_get_property;
  gobject_class->finalize = gst_live_avatar_finalize;
  element_class->change_state = gst_live_avatar_change_state;

  const GParamFlags flags = static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS |
                                                     GST_PARAM_MUTABLE_READY);
  g_object_class_install_property(
      gobject_class, PROP_BACKEND,
      g_param_spec_enum("backend", "Backend", "What animates the portrait (changeable in NULL/READY only)",
                        GST_TYPE_LIVE_AVATAR_BACKEND, DEFAULT_BACKEND, flags));
  g_object_class_install_property(
      gobject_class, PROP_WIDTH,
      g_param_spec_int("width", "Width",
                       "Output width in pixels, set together with height. backend=puppet: an even number from 64 to "
                       "8192; 0 = what downstream asks for, else the portrait's size (longest side at most 1024, "
                       "multiples of 16). backend=liveavatar: a multiple of 64 (other sizes are refused); 0 = the "
                       "portrait's aspect in multiples of 64, the largest under max-area (changeable in NULL/READY "
                       "only)",
                       0, 8192, DEFAULT_WIDTH, flags));
  g_object_class_install_property(
      gobject_class, PROP_HEIGHT,
      g_param_spec_int("height", "Height",
                       "Output height in pixels, set together with width. backend=puppet: an even number from 64 to "
                       "8192; 0 = what downstream asks for, else the portrait's size (longest side at most 1024, "
                       "multiples of 16). backend=liveavatar: a multiple of 64 (other sizes are refused); 0 = the "
                       "portrait's aspect in multiples of 64, the largest under max-area (changeable in NULL/READY "
                       "only)",
                       0, 8192, DEFAULT_HEIGHT, flags));
  g_object_class_install_property(
      gobject_class, PROP_SEED,
      g_param_spec_uint64("seed", "Seed",
                          "Random seed: the same seed and input give the same video (changeable in NULL/READY only)",
                          0, G_MAXUINT64, DEFAULT_SEED, flags));
  g_object_class_install_property(
      gobject_class, PROP_MOUTH_BOX,
      g_param_spec_string("mouth-box", "Mouth box",
                          "Mouth rectangle \"x,y,width,height\" in portrait pixels; empty = found by the face "
                          "detector (changeable in NULL/READY only)",
                          DEFAULT_MOUTH_BOX, flags));

  g_object_class_install_property(
      gobject_class, PROP_MODEL_DIR,
      g_param_spec_string("model-dir", "Model folder",
                          "backend=liveavatar: folder with Wan2.2-S2V-14B/ (DiT shards, Wan2.1_VAE.pth, umT5, wav2vec2) "
                          "and LiveAvatar/liveavatar.safetensors (changeable in NULL/READY only)",
                          DEFAULT_MODEL_DIR, flags));
  g_object_class_install_property(
      gobject_class, PROP_LORA,
      g_param_spec_string("lora", "LoRA",
                          "backend=liveavatar: LiveAvatar LoRA file; empty = model-dir/LiveAvatar/liveavatar.safetensors "
                          "(changeable in NULL/READY only)",
                          DEFAULT_LORA, flags));
  g_object_class_install_property(
      gobject_class, PROP_PROMPT,
      g_param_spec_string("prompt", "Prompt",
                          "backend=liveavatar: text prompt, encoded once and cached (changeable in NULL/READY only)",
                          DEFAULT_PROMPT, flags));
  g_object_class_install_property(
      gobject_class, PROP_PRECISION,
      g_param_spec_enum("precision", "Precision",
                        "backend=liveavatar: DiT precision: fp32, bf16, or fp8 (e4m3 linear weights with a scale, "
                        "bf16 activations) (changeable in NULL/READY only)",
                        GST_TYPE_LIVE_AVATAR_PRECISION, DEFAULT_PRECISION, flags));
  g_object_class_install_property(
      gobject_class, PROP_MAX_AREA,
      g_param_spec_uint("max-area", "Maximum area",
                        "backend=liveavatar with width=height=0: the output's area in pixels stays at most this "
                        "(default 704x384 = 270336, the model's training size; time and memory grow with the area). "
                        "Changeable in NULL/READY only",
                        64 * 64, G_MAXUINT, DEFAULT_MAX_AREA, flags));
  g_object_class_install_property(
      gobject_class, PROP_LAG_POLICY,
      g_param_spec_enum("lag-policy", "Lag policy",
                        "Live, backend=liveavatar: what happens when the model does not make a frame by its time. "
                        "wait: the frame is waited for and the latency grows (reported); drop: the last frame is "
                        "shown again and the model skips the blocks it cannot make in time; puppet: the puppet draws "
                        "those frames from the same portrait and audio; degrade: fewer denoising steps while the "
                        "model falls behind (full again once it keeps up), frames still late repeat the last one. "
                        "The video stays exactly as long as the audio with each (changeable in any state)",
                        GST_TYPE_LIVE_AVATAR_LAG_POLICY, DEFAULT_LAG_POLICY,
                        static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS |
                                                 GST_PARAM_MUTABLE_PLAYING)));

  g_object_class_install_property(
      gobject_class, PROP_PARALLEL,
      g_param_spec_enum("parallel", "Parallel plan",
                        "backend=liveavatar: how the DiT is spread over `devices` (docs/parallel.md). single: one "
                        "device; step: 4 ranks, one per denoising step, each with the whole DiT; stage: a layer "
                        "pipeline of 2 or more ranks (rank k holds layers [kL/N, (k+1)L/N)); auto: the memory "
                        "planner's choice. The plan is posted as the element message \"liveavatar-plan\" (changeable "
                        "in NULL/READY only)",
                        GST_TYPE_LIVE_AVATAR_PARALLEL, DEFAULT_PARALLEL, flags));
  g_object_class_install_property(
      gobject_class, PROP_DEVICES,
      g_param_spec_string("devices", "Devices",
                          "backend=liveavatar: one device per rank: \"cpu\", \"cpu:N\" (N CPU ranks as threads), "
                          "or \"cuda:0,cuda:1,...\" (a CUDA build). Must match parallel: single takes one, step 4, "
                          "stage N >= 2 (changeable in NULL/READY only)",
                          DEFAULT_DEVICES, flags));
  g_object_class_install_property(
      gobject_class, PROP_KV_PRECISION,
      g_param_spec_enum("kv-precision", "KV precision",
                        "backend=liveavatar: storage of the KV caches (rings and sink); auto = the DiT's "
                        "activations (fp32 with precision=fp32, else bf16); fp8 holds a quarter of fp32's bytes "
                        "and is read back in the activations' precision (changeable in NULL/READY only)",
                        GST_TYPE_LIVE_AVATAR_KV_PRECISION, DEFAULT_KV_PRECISION, flags));
  g_object_class_install_property(
      gobject_class, PROP_RENDEZVOUS,
      g_param_spec_string("rendezvous", "Rendezvous",
                          "backend=liveavatar, parallel step/stage: \"host:port\" where this element (rank 0) hosts "
                          "the c10d store that liveavatar-worker processes join (ranks 1.. on this or other hosts, "
                          "started with the same host:port, plan and devices); empty = every rank is a thread of "
                          "this process (changeable in NULL/READY only)",
                          DEFAULT_RENDEZVOUS, flags));
  g_object_class_install_property(
      gobject_class, PROP_PARALLEL_TIMEOUT,
      g_param_spec_uint("parallel-timeout", "Parallel timeout",
                        "backend=liveavatar, parallel step/stage: milliseconds a rank waits for another (to join, to "
                        "send its part of a block) before the stream fails with an error naming that rank "
                        "(changeable in NULL/READY only)",
                        100, 24 * 3600 * 1000, DEFAULT_PARALLEL_TIMEOUT, flags));
  g_object_class_install_property(
      gobject_class, PROP_STATS_INTERVAL,
      g_param_spec_uint("stats-interval", "Stats interval",
                        "Milliseconds between element messages named liveavatar-stats (speaking, fps, latency, queue "
                        "depths, denoising steps); 0 = none (changeable in any state)",
                        0, 3600000, DEFAULT_STATS_INTERVAL,
                        static_cast<GParamFlags>(G_PARAM_READWRITE | G_PARAM_STATIC_STRINGS |
                                                 GST_PARAM_MUTABLE_PLAYING)));

  g_object_class_install_property(
      gobject_class, PROP_VAD_MODEL,
      g_param_spec_string("vad-model", "VAD model",
                          "Silero VAD TorchScript file (silero_vad.jit of the PyPI package silero-vad) that decides "
                          "\"speaking\" in the stats messages; empty = $LIVEAVATAR_VAD_MODEL, else the one in the "
                          "project venv found at build time. Without it an energy gate decides, with a warning "
                          "(changeable in NULL/READY only)",
                          DEFAULT_VAD_MODEL, flags));

  gst_element_class_add_static_pad_template_with_gtype(element_class, &image_template, GST_TYPE_AGGREGATOR_PAD);
  gst_element_class_add_static_pad_template_with_gtype(element_class, &audio_template, GST_TYPE_AGGREGATOR_PAD);
  gst_element_class_add_static_pad_template_with_gtype(element_class, &src_template, GST_TYPE_AGGREGATOR_PAD);
  gst_element_class_set_static_metadata(element_class, "Live avatar", "Mixer/Video/Audio",
                                        "Animates a portrait from speech: image + audio in, talking-head video out",
                                        "gst-liveavatar developers");

  agg_class->aggregate = gst_live_avatar_aggregate;
  agg_class->update_src_caps = gst_live_avatar_update_src_caps;
  agg_class->fixate_src_caps = gst_live_avatar_fixate_src_caps;
  agg_class->negotiated_src_caps = gst_live_avatar_negotiated_src_caps;
  agg_class->get_next_time = gst_live_avatar_get_next_time;
  agg_class->sink_event = gst_live_avatar_sink_event;
  agg_class->sink_event_pre_queue = gst_live_avatar_sink_event_pre_queue;
  agg_class->flush = gst_live_avatar_flush;
  agg_class->src_event = gst_live_avatar_src_event;
  agg_class->src_query = gst_live_avatar_src_query;
  agg_class->sink_query = gst_live_avatar_sink_query;
  agg_class->start = gst_live_avatar_start;
  agg_class->stop = gst_live_avatar_stop;

  gst_type_mark_as_plugin_api(GST_TYPE_LIVE_AVATAR_BACKEND, static_cast<GstPluginAPIFlags>(0));
  gst_type_mark_as_plugin_api(GST_TYPE_LIVE_AVATAR_PRECISION, static_cast<GstPluginAPIFlags>(0));
  gst_type_mark_as_plugin_api(GST_TYPE_LIVE_AVATAR_LAG_POLICY, static_cast<GstPluginAPIFlags>(0));
  gst_type_mark_as_plugin_api(GST_TYPE_LIVE_AVATAR_PARALLEL, static_cast<GstPluginAPIFlags>(0));
  gst_type_mark_as_plugin_api(GST_TYPE_LIVE_AVATAR_KV_PRECISION, static_cast<GstPluginAPIFlags>(0));
}

static void gst_live_avatar_init(GstLiveAvatar* self) {
  GstElementClass* klass = GST_ELEMENT_GET_CLASS(self);
  self->priv = new GstLiveAvatarPrivate();
  gst_video_info_init(&self->priv->state.out_info);
  gst_segment_init(&self->priv->state.audio_segment, GST_FORMAT_TIME);

  auto make_pad = [&](const char* name) {
    GstPadTemplate* templ = gst_element_class_get_pad_template(klass, name);
    GstAggregatorPad* pad = GST_AGGREGATOR_PAD(
        g_object_new(GST_TYPE_AGGREGATOR_PAD, "name", name, "direction", GST_PAD_SINK, "template", templ, nullptr));
    gst_element_add_pad(GST_ELEMENT(self), GST_PAD(pad));
    return pad;
  };
  self->image_pad = make_pad("image");
  self->audio_pad = make_pad("audio");
}
