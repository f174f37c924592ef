// libFuzzer target: the liveavatar element (backend puppet) driven through GstHarness by a script decoded from the
// input: caps on both pads (odd sizes, every image format of the pad template, refused audio caps), pictures whose
// buffers are too short or too long, audio buffers of any size with any timestamp / duration / DISCONT / GAP flag,
// GAP and SEGMENT events, flushes on either pad, EOS at any point, caps changes mid-stream. The plugin and the
// engine are compiled into this binary with the sanitizers (GStreamer itself is linked as the system has it).
// Besides the sanitizers and GLib criticals, every output buffer is checked: its size is that of the negotiated caps,
// it has a duration and a valid timestamp. A hang is found by libFuzzer's -timeout.
// SPDX-License-Identifier: LGPL-2.1-or-later
#include <fuzzer/FuzzedDataProvider.h>
#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gst/video/video.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

GST_ELEMENT_REGISTER_DECLARE(liveavatar);

namespace {

constexpr GstClockTime kFrame = GST_SECOND / 25;
const char* const kImageFormats[] = {"RGB",  "BGR",  "RGBA", "BGRA", "ARGB", "ABGR", "RGBx", "BGRx", "xRGB", "xBGR",
                                     "GRAY8", "I420", "YV12", "NV12", "NV21", "Y444", "Y42B", "YUY2", "UYVY"};

void fail(const char* what) {
  std::fprintf(stderr, "element_fuzzer: %s\n", what);
  std::abort();
}

GstBusSyncReply drop_message(GstBus*, GstMessage*, gpointer) { return GST_BUS_DROP; }

// Serialized data for one sink pad goes through its own thread, as from an upstream streaming thread: a push waits
// while the element holds the pad's previous buffer (a second picture before the first is taken, audio before any
// picture), and the script must go on (flushes, the other pad) meanwhile. Flushes come from the script's thread.
class PadWorker {
 public:
  explicit PadWorker(GstHarness* h) : h_(h), thread_([this] { run(); }) {}
  ~PadWorker() { stop(); }
  GstHarness* harness() const { return h_; }
  void post(std::function<void(GstHarness*)> op) {
    std::lock_guard<std::mutex> lock(mutex_);
    ops_.push_back(std::move(op));
    cond_.notify_one();
  }
  // Call once the element is in NULL: what is left is discarded (each op called with nullptr frees what it holds)
  // and the thread ends.
  void stop() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      quit_ = true;
      cond_.notify_one();
    }
    if (thread_.joinable()) thread_.join();
  }

 private:
  void run() {
    for (;;) {
      std::function<void(GstHarness*)> op;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        cond_.wait(lock, [this] { return quit_ || !ops_.empty(); });
        if (ops_.empty()) return;
        op = std::move(ops_.front());
        ops_.pop_front();
      }
      op(quit_ ? nullptr : h_);  // read unlocked: at worst one more op goes to an element in NULL, which refuses it
    }
  }
  GstHarness* h_;
  std::mutex mutex_;
  std::condition_variable cond_;
  std::deque<std::function<void(GstHarness*)>> ops_;
  std::atomic<bool> quit_{false};
  std::thread thread_;
};

// Output checks on whatever the element has pushed so far; returns true once EOS came out.
bool drain(GstHarness* out) {
  bool eos = false;
  while (GstEvent* ev = gst_harness_try_pull_event(out)) {
    if (GST_EVENT_TYPE(ev) == GST_EVENT_EOS) eos = true;
    gst_event_unref(ev);
  }
  while (GstBuffer* b = gst_harness_try_pull(out)) {
    GstCaps* caps = gst_pad_get_current_caps(out->sinkpad);
    if (!caps) fail("a buffer before caps");
    GstVideoInfo info;
    if (!gst_video_info_from_caps(&info, caps)) fail("output caps that are not raw video");
    gst_caps_unref(caps);
    if (gst_buffer_get_size(b) != GST_VIDEO_INFO_SIZE(&info)) fail("an output buffer of the wrong size");
    if (!GST_BUFFER_PTS_IS_VALID(b)) fail("an output buffer without a timestamp");
    // One frame of running time; in stream time that is 40 ms / the segment's rate, so only its presence is checked.
    if (!GST_BUFFER_DURATION_IS_VALID(b) || GST_BUFFER_DURATION(b) == 0) fail("an output buffer without a duration");
    gst_buffer_unref(b);
  }
  return eos;
}

GstClockTime fuzzed_time(FuzzedDataProvider& in) {
  switch (in.ConsumeIntegralInRange<int>(0, 7)) {
    case 0: return GST_CLOCK_TIME_NONE;
    case 1: return in.ConsumeIntegral<uint64_t>();  // anything, the far future included
    case 2: return in.ConsumeIntegralInRange<uint64_t>(0, 3600 * GST_SECOND);
    default: return in.ConsumeIntegralInRange<uint64_t>(0, 4 * GST_SECOND);  // near the stream
  }
}

void push_picture(FuzzedDataProvider& in, PadWorker* image) {
  const int w = in.ConsumeIntegralInRange<int>(1, 320), h = in.ConsumeIntegralInRange<int>(1, 320);
  const char* format = kImageFormats[in.ConsumeIntegralInRange<size_t>(0, G_N_ELEMENTS(kImageFormats) - 1)];
  const bool still = in.ConsumeBool();
  GstCaps* caps = gst_caps_new_simple("video/x-raw", "format", G_TYPE_STRING, format, "width", G_TYPE_INT, w,
                                      "height", G_TYPE_INT, h, "framerate", GST_TYPE_FRACTION, still ? 0 : 25, 1,
                                      nullptr);
  GstVideoInfo info;
  gst_video_info_set_format(&info, gst_video_format_from_string(format), w, h);
  size_t size = GST_VIDEO_INFO_SIZE(&info);
  if (in.ConsumeIntegralInRange<int>(0, 5) == 0) size = in.ConsumeIntegralInRange<size_t>(0, size + 64);  // wrong
  GstBuffer* buf = gst_buffer_new_allocate(nullptr, size, nullptr);
  const uint8_t fill = in.ConsumeIntegral<uint8_t>();
  gst_buffer_memset(buf, 0, fill, size);
  GST_BUFFER_PTS(buf) = fuzzed_time(in);
  GST_BUFFER_DURATION(buf) = fuzzed_time(in);
  image->post([caps, buf](GstHarness* h) {
    if (h) {
      gst_harness_push_event(h, gst_event_new_caps(caps));
      gst_harness_push(h, buf);
    } else {
      gst_buffer_unref(buf);
    }
    gst_caps_unref(caps);
  });
}

void push_audio(FuzzedDataProvider& in, PadWorker* audio, uint64_t* samples_left) {
  size_t bytes = in.ConsumeIntegralInRange<size_t>(0, 8000 * sizeof(float) + 3);  // not always whole samples
  bytes = std::min<uint64_t>(bytes, *samples_left * sizeof(float));
  *samples_left -= bytes / sizeof(float);
  GstBuffer* buf = gst_buffer_new_allocate(nullptr, bytes, nullptr);
  GstMapInfo map;
  gst_buffer_map(buf, &map, GST_MAP_WRITE);
  const int kind = in.ConsumeIntegralInRange<int>(0, 3);
  for (size_t i = 0; i + sizeof(float) <= bytes; i += sizeof(float)) {
    float v = kind == 0 ? 0.f : 0.3f * static_cast<float>(((i / 4) % 37)) / 37.f;
    if (kind == 3 && (i / 4) % 97 == 0) v = (i / 4) % 2 ? __builtin_nanf("") : __builtin_inff();  // not finite
    std::memcpy(map.data + i, &v, sizeof v);
  }
  gst_buffer_unmap(buf, &map);
  GST_BUFFER_PTS(buf) = fuzzed_time(in);
  GST_BUFFER_DURATION(buf) = fuzzed_time(in);
  if (in.ConsumeBool()) GST_BUFFER_FLAG_SET(buf, GST_BUFFER_FLAG_DISCONT);
  if (in.ConsumeIntegralInRange<int>(0, 7) == 0) GST_BUFFER_FLAG_SET(buf, GST_BUFFER_FLAG_GAP);
  audio->post([buf](GstHarness* h) {
    if (h)
      gst_harness_push(h, buf);
    else
      gst_buffer_unref(buf);
  });
}

// A serialized event through the pad's worker.
void post_event(PadWorker* w, GstEvent* event) {
  w->post([event](GstHarness* h) {
    if (h)
      gst_harness_push_event(h, event);
    else
      gst_event_unref(event);
  });
}

void push_segment(FuzzedDataProvider& in, PadWorker* w) {
  GstSegment seg;
  const bool time = in.ConsumeIntegralInRange<int>(0, 5) != 0;
  gst_segment_init(&seg, time ? GST_FORMAT_TIME : GST_FORMAT_BYTES);
  const double rates[] = {1.0, 2.0, 0.5, -1.0};
  seg.rate = rates[in.ConsumeIntegralInRange<int>(0, 3)];
  seg.start = in.ConsumeIntegralInRange<uint64_t>(0, 10 * GST_SECOND);
  seg.time = seg.start;
  seg.position = seg.start;
  if (in.ConsumeBool()) seg.stop = seg.start + in.ConsumeIntegralInRange<uint64_t>(0, 4 * GST_SECOND);
  post_event(w, gst_event_new_segment(&seg));
}

// FLUSH_START is not serialized: it comes from the script's thread and unblocks a waiting push; FLUSH_STOP follows
// it, in the stream, through the pad's worker (as a seek's flush would reach the pad).
void flush(FuzzedDataProvider& in, PadWorker* w) {
  gst_harness_push_event(w->harness(), gst_event_new_flush_start());
  post_event(w, gst_event_new_flush_stop(/*reset_time=*/in.ConsumeBool()));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  // Only the plugin compiled in here and the core elements: no registry scan of the system's plugins.
  g_setenv("GST_REGISTRY_DISABLE", "yes", TRUE);
  g_setenv("GST_PLUGIN_SYSTEM_PATH_1_0", "", TRUE);
  g_setenv("GST_PLUGIN_PATH_1_0", "", TRUE);
  gst_init(argc, argv);
  // A GLib critical (a g_return_if_fail in GStreamer tripped by the element) is a finding, as with G_DEBUG=fatal-criticals
  // in the element tests.
  // abort() rather than GLib's breakpoint trap, so libFuzzer saves the input.
  g_log_set_default_handler(
      [](const gchar* domain, GLogLevelFlags level, const gchar* message, gpointer) {
        g_log_default_handler(domain, level, message, nullptr);
        if (level & (G_LOG_LEVEL_CRITICAL | G_LOG_LEVEL_ERROR)) fail("a GLib critical (see above)");
      },
      nullptr);
  if (!GST_ELEMENT_REGISTER(liveavatar, nullptr)) fail("cannot register the element");
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider in(data, size);
  GstElement* e = gst_element_factory_make("liveavatar", nullptr);
  if (!e) fail("no liveavatar element");
  if (in.ConsumeBool()) g_object_set(e, "width", 64 + 16 * in.ConsumeIntegralInRange<int>(0, 12), "height",
                                     64 + 16 * in.ConsumeIntegralInRange<int>(0, 12), nullptr);
  GstBus* bus = gst_bus_new();
  gst_bus_set_sync_handler(bus, drop_message, nullptr, nullptr);
  gst_element_set_bus(e, bus);
  GstHarness* audio_h = gst_harness_new_with_element(e, "audio", "src");
  GstHarness* image_h = in.ConsumeIntegralInRange<int>(0, 15) ? gst_harness_new_with_element(e, "image", nullptr)
                                                              : nullptr;  // sometimes left unlinked
  gst_harness_set_live(audio_h, FALSE);
  if (image_h) gst_harness_set_live(image_h, FALSE);
  if (in.ConsumeBool()) gst_harness_set_sink_caps_str(audio_h, in.ConsumeBool() ? "video/x-raw,format=I420"
                                                                               : "video/x-raw,format=RGB");
  gst_harness_play(audio_h);
  auto audio = std::make_unique<PadWorker>(audio_h);
  auto image = image_h ? std::make_unique<PadWorker>(image_h) : nullptr;
  // Mostly the start a real upstream gives (stream-start, caps, a TIME segment), sometimes parts of it missing.
  const bool prologue = in.ConsumeIntegralInRange<int>(0, 7) != 0;
  if (prologue) {
    GstSegment seg;
    gst_segment_init(&seg, GST_FORMAT_TIME);
    post_event(audio.get(), gst_event_new_stream_start("audio"));
    GstCaps* caps = gst_caps_from_string("audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved");
    post_event(audio.get(), gst_event_new_caps(caps));
    gst_caps_unref(caps);
    post_event(audio.get(), gst_event_new_segment(&seg));
    if (image) {
      post_event(image.get(), gst_event_new_stream_start("image"));
      post_event(image.get(), gst_event_new_segment(&seg));
    }
  }

  uint64_t samples_left = 16000 * 6;  // at most 6 s of audio samples per input, so one input stays quick
  bool eos_sent = false, eos_seen = false;
  for (int step = 0; step < 48 && in.remaining_bytes() > 0 && !eos_seen; ++step) {
    switch (in.ConsumeIntegralInRange<int>(0, 13)) {
      case 0:
      case 1:
        if (image) push_picture(in, image.get());
        break;
      case 2:
        if (image) post_event(image.get(), gst_event_new_eos());
        break;
      case 3: {
        const int rate = in.ConsumeBool() ? 16000 : in.ConsumeIntegralInRange<int>(1, 96000);
        const int channels = in.ConsumeBool() ? 1 : in.ConsumeIntegralInRange<int>(1, 8);
        GstCaps* caps = gst_caps_new_simple("audio/x-raw", "format", G_TYPE_STRING, in.ConsumeBool() ? "F32LE" : "S16LE",
                                            "rate", G_TYPE_INT, rate, "channels", G_TYPE_INT, channels, "layout",
                                            G_TYPE_STRING, "interleaved", nullptr);
        post_event(audio.get(), gst_event_new_caps(caps));
        gst_caps_unref(caps);
        break;
      }
      case 4:
      case 5:
      case 6:
        push_audio(in, audio.get(), &samples_left);
        break;
      case 7: {
        const GstClockTime ts = fuzzed_time(in), duration = fuzzed_time(in);
        if (GST_CLOCK_TIME_IS_VALID(ts)) post_event(audio.get(), gst_event_new_gap(ts, duration));
        break;
      }
      case 8:
        push_segment(in, in.ConsumeBool() || !image ? audio.get() : image.get());
        break;
      case 9:
        flush(in, audio.get());
        break;
      case 10:
        if (image) flush(in, image.get());
        break;
      case 11:
        post_event(audio.get(), gst_event_new_eos());
        eos_sent = true;
        break;
      case 12:
        post_event(audio.get(), gst_event_new_stream_start(in.ConsumeBool() ? "audio" : "other"));
        break;
      default:
        g_usleep(in.ConsumeIntegralInRange<int>(0, 2000));  // let the threads run in between
        break;
    }
    eos_seen = drain(audio_h);
  }
  // The end of the stream: wait (bounded) for the element to finish what it was given, checking what comes out.
  if (!eos_sent && in.ConsumeBool()) {
    post_event(audio.get(), gst_event_new_eos());
    eos_sent = true;
  }
  if (eos_sent)
    for (gint64 end = g_get_monotonic_time() + 300 * 1000; !eos_seen && g_get_monotonic_time() < end;) {
      eos_seen = drain(audio_h);
      if (!eos_seen) g_usleep(1000);
    }
  drain(audio_h);
  // PLAYING -> NULL whatever state the stream is in; a push still waiting then returns, and the workers end.
  if (gst_element_set_state(e, GST_STATE_NULL) != GST_STATE_CHANGE_SUCCESS) fail("the element did not go to NULL");
  audio->stop();
  if (image) image->stop();
  drain(audio_h);
  image.reset();
  audio.reset();
  if (image_h) gst_harness_teardown(image_h);
  gst_harness_teardown(audio_h);
  gst_object_unref(e);
  gst_bus_set_sync_handler(bus, nullptr, nullptr, nullptr);
  gst_object_unref(bus);
  return 0;
}
