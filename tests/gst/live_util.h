// A live pipeline around the element for timing tests: a still portrait, speech pushed as a live source pushes it
// (100 ms buffers, each when its last sample is due, the source's latency reported), and what the element pushed,
// when, and what it reported (latency query, LATENCY and QoS messages, CPU time).
#pragma once

#include <gst/app/gstappsink.h>
#include <gst/app/gstappsrc.h>
#include <gst/gst.h>
#include <gtest/gtest.h>
#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "media_io.h"

namespace liveutil {


inline constexpr GstClockTime kFrame = GST_SECOND / 25;
inline constexpr GstClockTime kBlock = 12 * kFrame;
inline constexpr GstClockTime kSource = 100 * GST_MSECOND;  // the audio source's latency: it delivers 100 ms buffers

inline const liveavatar::io::Image& portrait() {
  static const liveavatar::io::Image img =
      liveavatar::io::read_png(std::string(LIVEAVATAR_ASSETS_DIR) + "/portrait.png");
  return img;
}

inline GstBuffer* speech(GstClockTime pts, size_t n, guint64 first_sample) {
  GstBuffer* buf = gst_buffer_new_allocate(nullptr, n * sizeof(float), nullptr);
  GstMapInfo m;
  gst_buffer_map(buf, &m, GST_MAP_WRITE);
  auto* s = reinterpret_cast<float*>(m.data);
  for (size_t i = 0; i < n; ++i) {
    const double t = (first_sample + i) / 16000.0;
    s[i] = static_cast<float>(0.3 * std::sin(2 * M_PI * 180 * t) * (0.5 + 0.5 * std::sin(2 * M_PI * 3 * t)));
  }
  gst_buffer_unmap(buf, &m);
  GST_BUFFER_PTS(buf) = pts;
  GST_BUFFER_DURATION(buf) = gst_util_uint64_scale(n, GST_SECOND, 16000);
  return buf;
}

inline double cpu_seconds() {
  rusage u;
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}

struct Pushed {
  GstClockTime pts;
  GstClockTime at;  // running time when the element pushed it
  std::vector<guint8> data;
};

// One "liveavatar-stats" message.
struct Stats {
  GstClockTime at = 0;  // running time when it was read
  int steps = 0, steps_full = 0;
  gint64 frames_pending = 0, frames_queued = 0, blocks_degraded = 0;
  gint64 frames = 0;  // frames out so far
  double fps = 0;
  bool speaking = false;
};

struct LiveRun {
  std::vector<Pushed> frames;
  GstClockTime first_pts = GST_CLOCK_TIME_NONE;  // running time of the first audio sample
  GstClockTime latency_at_end = 0;               // the element's answer to a latency query after the stream
  GstClockTime latency_in_stream = 0;            // ... and while it runs
  int latency_messages_playing = 0;              // LATENCY from the element after PLAYING
  guint64 qos_processed = 0, qos_dropped = 0;    // the last QoS message's counts
  std::vector<GstClockTime> replaced;            // running times of the frames the QoS messages report replaced
  int qos_quality_min = 1000000;                 // the lowest quality a QoS message reported
  std::vector<Stats> stats;                      // the element's stats messages
  double cpu = 0, wall = 0;                      // CPU and wall seconds from PLAYING to EOS
  double cpu_first = 0, wall_first = 0;          // ... and from PLAYING to the first frame
  std::string error;
};

// A live pipeline: a still portrait, `seconds` of speech pushed as a live source would (100 ms buffers, each when
// its last sample is due), and the element with `props`; `block_ms` > 0 makes it a slow block model.
inline LiveRun run_live(const std::string& props, int block_ms, double seconds, int slow_blocks = 0) {
  GError* err = nullptr;
  const std::string launch =
      "appsrc name=img format=time caps=video/x-raw,format=RGB,width=512,height=512,framerate=0/1 ! videoconvert ! "
      "la.image appsrc name=aud is-live=true format=time min-latency=100000000 "
      "caps=audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved ! la.audio "
      "liveavatar name=la width=128 height=128 " + props + " ! appsink name=out sync=false max-buffers=0";
  GstElement* pipe = gst_parse_launch(launch.c_str(), &err);
  LiveRun run;
  EXPECT_EQ(err, nullptr) << (err ? err->message : "");
  if (!pipe) return run;
  GstElement* img = gst_bin_get_by_name(GST_BIN(pipe), "img");
  GstElement* aud = gst_bin_get_by_name(GST_BIN(pipe), "aud");
  GstElement* out = gst_bin_get_by_name(GST_BIN(pipe), "out");
  GstElement* la = gst_bin_get_by_name(GST_BIN(pipe), "la");
  if (block_ms > 0) g_object_set_data(G_OBJECT(la), "liveavatar-testing-block-delay-ms", GINT_TO_POINTER(block_ms));
  if (slow_blocks > 0) g_object_set_data(G_OBJECT(la), "liveavatar-testing-slow-blocks", GINT_TO_POINTER(slow_blocks));

  std::mutex mutex;
  struct Probe {
    GstElement* la;
    std::mutex* mutex;
    LiveRun* run;
    double cpu0;
    gint64 wall0;
  } probe{la, &mutex, &run, 0, 0};
  GstPad* src = gst_element_get_static_pad(la, "src");
  gst_pad_add_probe(
      src, GST_PAD_PROBE_TYPE_BUFFER,
      [](GstPad*, GstPadProbeInfo* info, gpointer data) -> GstPadProbeReturn {
        auto* p = static_cast<Probe*>(data);
        GstBuffer* b = GST_PAD_PROBE_INFO_BUFFER(info);
        GstClock* clock = gst_element_get_clock(p->la);
        const GstClockTime now = gst_clock_get_time(clock) - gst_element_get_base_time(p->la);
        gst_object_unref(clock);
        GstMapInfo m;
        gst_buffer_map(b, &m, GST_MAP_READ);
        std::lock_guard<std::mutex> lock(*p->mutex);
        if (p->run->frames.empty()) {
          p->run->cpu_first = cpu_seconds() - p->cpu0;
          p->run->wall_first = (g_get_monotonic_time() - p->wall0) / 1e6;
        }
        p->run->frames.push_back({GST_BUFFER_PTS(b), now, std::vector<guint8>(m.data, m.data + m.size)});
        gst_buffer_unmap(b, &m);
        return GST_PAD_PROBE_OK;
      },
      &probe, nullptr);
  gst_object_unref(src);

  GstBuffer* picture = gst_buffer_new_memdup(portrait().data.data(), portrait().data.size());
  GST_BUFFER_PTS(picture) = 0;
  gst_app_src_push_buffer(GST_APP_SRC(img), picture);
  gst_app_src_end_of_stream(GST_APP_SRC(img));
  const double cpu0 = cpu_seconds();
  const gint64 wall0 = g_get_monotonic_time();
  probe.cpu0 = cpu0;
  probe.wall0 = wall0;
  // What is posted up to PAUSED (the first latency figure, ...) is not counted: only what changes while playing.
  EXPECT_NE(gst_element_set_state(pipe, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  gst_element_get_state(pipe, nullptr, nullptr, 5 * GST_SECOND);
  GstBus* bus = gst_element_get_bus(pipe);
  while (GstMessage* m = gst_bus_pop(bus)) gst_message_unref(m);
  EXPECT_NE(gst_element_set_state(pipe, GST_STATE_PLAYING), GST_STATE_CHANGE_FAILURE);

  GstClock* clock = gst_pipeline_get_clock(GST_PIPELINE(pipe));
  const GstClockTime base = gst_element_get_base_time(pipe);
  auto running_time = [&] { return gst_clock_get_time(clock) - base; };
  // The speech starts once the element idles (its first frame, or 3 s), as a live source that starts after the
  // portrait is there: audio from before the idling started would be trimmed as already shown.
  for (gint64 end = g_get_monotonic_time() + 3000000; g_get_monotonic_time() < end; g_usleep(5000)) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!run.frames.empty()) break;
  }
  const GstClockTime t0 = running_time() / kFrame * kFrame + kFrame;
  run.first_pts = t0;
  const size_t total = static_cast<size_t>(seconds * 16000);
  std::thread feeder([&] {
    for (size_t at = 0; at < total; at += 1600) {
      const size_t n = std::min<size_t>(1600, total - at);
      const GstClockTime pts = t0 + gst_util_uint64_scale(at, GST_SECOND, 16000);
      const GstClockTime due = pts + gst_util_uint64_scale(n, GST_SECOND, 16000);
      while (running_time() < due) g_usleep(2000);
      gst_app_src_push_buffer(GST_APP_SRC(aud), speech(pts, n, at));
    }
    gst_app_src_end_of_stream(GST_APP_SRC(aud));
  });

  const gint64 give_up = g_get_monotonic_time() + static_cast<gint64>((seconds * 4 + 20) * 1e6);
  bool queried = false;
  while (g_get_monotonic_time() < give_up) {
    while (GstMessage* m = gst_bus_pop(bus)) {
      if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_LATENCY) {
        if (GST_MESSAGE_SRC(m) == GST_OBJECT(la)) ++run.latency_messages_playing;
        gst_bin_recalculate_latency(GST_BIN(pipe));  // what an application does
      } else if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_QOS && GST_MESSAGE_SRC(m) == GST_OBJECT(la)) {
        GstFormat fmt;
        const guint64 dropped_before = run.qos_dropped;
        gst_message_parse_qos_stats(m, &fmt, &run.qos_processed, &run.qos_dropped);
        gboolean live;
        guint64 rt, stream_time, ts, dur;
        gst_message_parse_qos(m, &live, &rt, &stream_time, &ts, &dur);
        if (run.qos_dropped > dropped_before) run.replaced.push_back(rt);
        gint64 jitter;
        gdouble proportion;
        gint quality;
        gst_message_parse_qos_values(m, &jitter, &proportion, &quality);
        run.qos_quality_min = std::min(run.qos_quality_min, quality);
      } else if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_ELEMENT && GST_MESSAGE_SRC(m) == GST_OBJECT(la) &&
                 gst_structure_has_name(gst_message_get_structure(m), "liveavatar-stats")) {
        const GstStructure* st = gst_message_get_structure(m);
        Stats x;
        x.at = running_time();
        gst_structure_get_int(st, "denoising-steps", &x.steps);
        gst_structure_get_int(st, "denoising-steps-full", &x.steps_full);
        gst_structure_get_int64(st, "frames-pending", &x.frames_pending);
        gst_structure_get_int64(st, "frames-queued", &x.frames_queued);
        gst_structure_get_int64(st, "blocks-degraded", &x.blocks_degraded);
        gst_structure_get_int64(st, "frames", &x.frames);
        gst_structure_get_double(st, "fps", &x.fps);
        gboolean speaking = FALSE;
        gst_structure_get_boolean(st, "speaking", &speaking);
        x.speaking = speaking;
        run.stats.push_back(x);
      } else if (GST_MESSAGE_TYPE(m) == GST_MESSAGE_ERROR) {
        GError* e = nullptr;
        gst_message_parse_error(m, &e, nullptr);
        run.error = e->message;
        g_error_free(e);
      }
      gst_message_unref(m);
    }
    if (!run.error.empty() || gst_app_sink_is_eos(GST_APP_SINK(out))) break;
    if (!queried && running_time() > t0 + static_cast<GstClockTime>(seconds / 2 * GST_SECOND)) {
      GstQuery* q = gst_query_new_latency();
      if (gst_element_query(la, q)) gst_query_parse_latency(q, nullptr, &run.latency_in_stream, nullptr);
      gst_query_unref(q);
      queried = true;
    }
    while (GstSample* s = gst_app_sink_try_pull_sample(GST_APP_SINK(out), 0)) gst_sample_unref(s);
    g_usleep(5000);
  }
  feeder.join();
  run.cpu = cpu_seconds() - cpu0;
  run.wall = (g_get_monotonic_time() - wall0) / 1e6;
  GstQuery* q = gst_query_new_latency();
  if (gst_element_query(la, q)) gst_query_parse_latency(q, nullptr, &run.latency_at_end, nullptr);
  gst_query_unref(q);
  gst_object_unref(bus);
  gst_object_unref(clock);
  gst_element_set_state(pipe, GST_STATE_NULL);
  for (GstElement* e : {img, aud, out, la}) gst_object_unref(e);
  gst_object_unref(pipe);
  return run;
}

// Frames in order at exactly 25 fps, the last one covering the end of the audio and none beyond it. Live, the
// element idles from the moment the portrait is there, so the first frame may come before the first sample.
inline void expect_exact_frames(const LiveRun& r, double seconds) {
  ASSERT_FALSE(r.frames.empty());
  const GstClockTime first = r.frames[0].pts;
  ASSERT_LE(first, r.first_pts);
  const GstClockTime audio_end = r.first_pts + static_cast<GstClockTime>(std::llround(seconds * GST_SECOND));
  const size_t expected = static_cast<size_t>((audio_end - first + kFrame - 1) / kFrame);
  ASSERT_EQ(r.frames.size(), expected) << "frames from " << first << " ns to the audio's end at " << audio_end;
  for (size_t i = 0; i < r.frames.size(); ++i) ASSERT_EQ(r.frames[i].pts, first + i * kFrame) << "frame " << i;
}

// How late the element pushed frames: the largest (push time - frame start).
inline GstClockTime worst_delay(const LiveRun& r) {
  GstClockTime worst = 0;
  for (const auto& f : r.frames) worst = std::max(worst, f.at > f.pts ? f.at - f.pts : 0);
  return worst;
}

inline int repeated_frames(const LiveRun& r) {
  int n = 0;
  for (size_t i = 1; i < r.frames.size(); ++i) n += r.frames[i].data == r.frames[i - 1].data;
  return n;
}

}  // namespace liveutil
