// The liveavatar element through GstHarness (one harness per sink pad) and, for live behaviour, a real pipeline.
#include <gst/app/gstappsink.h>
#include <gst/app/gstappsrc.h>
#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gst/video/video.h>
#include <gtest/gtest.h>

#include <cmath>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "media_io.h"

namespace {

constexpr GstClockTime kFrame = GST_SECOND / 25;
const char kAudioCaps[] = "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved";

std::string asset(const char* name) { return std::string(LIVEAVATAR_ASSETS_DIR) + "/" + name; }

GstBuffer* image_buffer(int w, int h, GstVideoFormat fmt, guint8 fill, const liveavatar::io::Image* img = nullptr) {
  GstVideoInfo info;
  gst_video_info_set_format(&info, fmt, w, h);
  GstBuffer* buf = gst_buffer_new_allocate(nullptr, GST_VIDEO_INFO_SIZE(&info), nullptr);
  gst_buffer_memset(buf, 0, fill, GST_VIDEO_INFO_SIZE(&info));
  if (img && fmt == GST_VIDEO_FORMAT_RGB) {
    GstVideoFrame f;
    gst_video_frame_map(&f, &info, buf, GST_MAP_WRITE);
    for (int y = 0; y < h; ++y)
      memcpy(static_cast<guint8*>(GST_VIDEO_FRAME_PLANE_DATA(&f, 0)) + y * GST_VIDEO_FRAME_PLANE_STRIDE(&f, 0),
             img->data.data() + static_cast<size_t>(y) * w * 3, static_cast<size_t>(w) * 3);
    gst_video_frame_unmap(&f);
  }
  GST_BUFFER_PTS(buf) = 0;
  return buf;
}

const liveavatar::io::Image& portrait() {
  static const liveavatar::io::Image img = liveavatar::io::read_png(asset("portrait.png"));
  return img;
}

GstBuffer* audio_buffer(GstClockTime pts, size_t samples, float amplitude = 0.3f) {
  GstBuffer* buf = gst_buffer_new_allocate(nullptr, samples * sizeof(float), nullptr);
  GstMapInfo map;
  gst_buffer_map(buf, &map, GST_MAP_WRITE);
  float* s = reinterpret_cast<float*>(map.data);
  const guint64 first = gst_util_uint64_scale(pts, 16000, GST_SECOND);
  for (size_t i = 0; i < samples; ++i) s[i] = amplitude * std::sin(2 * M_PI * 220.0 * (first + i) / 16000.0);
  gst_buffer_unmap(buf, &map);
  GST_BUFFER_PTS(buf) = pts;
  GST_BUFFER_DURATION(buf) = gst_util_uint64_scale(samples, GST_SECOND, 16000);
  return buf;
}

// Two harnesses on one element: `audio` drives audio -> src, `image` only feeds the image pad.
struct Avatar {
  GstHarness* audio = nullptr;
  GstHarness* image = nullptr;
  GstBus* bus = nullptr;
  // Every message the element posts, collected by a sync handler (the bus has no main loop here).
  std::mutex mutex;
  std::vector<GstMessage*> messages;

  static GstBusSyncReply collect(GstBus*, GstMessage* m, gpointer data) {
    auto* self = static_cast<Avatar*>(data);
    std::lock_guard<std::mutex> lock(self->mutex);
    self->messages.push_back(gst_message_ref(m));
    return GST_BUS_DROP;
  }

  // Messages of `type` collected so far (new references).
  std::vector<GstMessage*> take(GstMessageType type) {
    std::lock_guard<std::mutex> lock(mutex);
    std::vector<GstMessage*> out;
    for (auto*& m : messages)
      if (m && (GST_MESSAGE_TYPE(m) & type)) {
        out.push_back(m);
        m = nullptr;
      }
    return out;
  }

  explicit Avatar(const char* props = nullptr, bool link_image = true) {
    GstElement* e = gst_element_factory_make("liveavatar", nullptr);
    EXPECT_NE(e, nullptr) << "liveavatar plugin not found (GST_PLUGIN_PATH)";
    if (props) {
      // props: "name=value name=value"
      gchar** kv = g_strsplit(props, " ", -1);
      for (gchar** p = kv; *p; ++p) {
        gchar** pair = g_strsplit(*p, "=", 2);
        gst_util_set_object_arg(G_OBJECT(e), pair[0], pair[1]);
        g_strfreev(pair);
      }
      g_strfreev(kv);
    }
    bus = gst_bus_new();
    gst_bus_set_sync_handler(bus, collect, this, nullptr);
    gst_element_set_bus(e, bus);
    audio = gst_harness_new_with_element(e, "audio", "src");
    gst_harness_set_live(audio, FALSE);
    if (link_image) {
      image = gst_harness_new_with_element(e, "image", nullptr);
      gst_harness_set_live(image, FALSE);
    }
    gst_object_unref(e);
    gst_harness_play(audio);
  }
  ~Avatar() {
    if (image) gst_harness_teardown(image);
    gst_harness_teardown(audio);
    gst_bus_set_sync_handler(bus, nullptr, nullptr, nullptr);
    gst_object_unref(bus);
    for (auto* m : messages)
      if (m) gst_message_unref(m);
  }

  void set_image(int w, int h, GstVideoFormat fmt = GST_VIDEO_FORMAT_RGB, bool eos = true) {
    gchar* caps = g_strdup_printf("video/x-raw,format=%s,width=%d,height=%d,framerate=0/1",
                                  gst_video_format_to_string(fmt), w, h);
    gst_harness_set_src_caps_str(image, caps);
    g_free(caps);
    const bool real = fmt == GST_VIDEO_FORMAT_RGB && w == portrait().width && h == portrait().height;
    ASSERT_EQ(gst_harness_push(image, image_buffer(w, h, fmt, 128, real ? &portrait() : nullptr)), GST_FLOW_OK);
    if (eos) gst_harness_push_event(image, gst_event_new_eos());
  }
  void start_audio() { gst_harness_set_src_caps_str(audio, kAudioCaps); }

  // Pulls until EOS; returns the buffers.
  std::vector<GstBuffer*> pull_all() {
    std::vector<GstBuffer*> out;
    for (;;) {
      GstEvent* ev = nullptr;
      while ((ev = gst_harness_try_pull_event(audio))) {
        const bool eos = GST_EVENT_TYPE(ev) == GST_EVENT_EOS;
        gst_event_unref(ev);
        if (eos) {
          while (GstBuffer* b = gst_harness_try_pull(audio)) out.push_back(b);
          return out;
        }
      }
      GstBuffer* b = gst_harness_try_pull(audio);
      if (b) {
        out.push_back(b);
        continue;
      }
      {
        std::lock_guard<std::mutex> lock(mutex);
        for (auto* m : messages)
          if (m && GST_MESSAGE_TYPE(m) == GST_MESSAGE_ERROR) return out;
      }
      g_usleep(2000);
    }
  }

  // The first error message on the element's bus, within `seconds`.
  std::string wait_error(double seconds = 5) {
    GstMessage* m = nullptr;
    for (gint64 end = g_get_monotonic_time() + static_cast<gint64>(seconds * 1e6); g_get_monotonic_time() < end;) {
      auto errors = take(GST_MESSAGE_ERROR);
      if (!errors.empty()) {
        m = errors[0];
        for (size_t i = 1; i < errors.size(); ++i) gst_message_unref(errors[i]);
        break;
      }
      g_usleep(5000);
    }
    if (!m) return "";
    GError* err = nullptr;
    gst_message_parse_error(m, &err, nullptr);
    std::string text = err->message;
    g_error_free(err);
    gst_message_unref(m);
    return text;
  }
};

void free_all(std::vector<GstBuffer*>& v) {
  for (auto* b : v) gst_buffer_unref(b);
  v.clear();
}

GstVideoInfo output_info(GstHarness* h) {
  GstCaps* caps = gst_pad_get_current_caps(h->sinkpad);
  GstVideoInfo info;
  gst_video_info_init(&info);
  EXPECT_NE(caps, nullptr);
  if (caps) {
    EXPECT_TRUE(gst_video_info_from_caps(&info, caps));
    gst_caps_unref(caps);
  }
  return info;
}

}  // namespace

// What gst-inspect-1.0 shows of each of the element's own properties: a nick and a blurb that says what it does and
// when it can be changed (the flag GST_PARAM_MUTABLE_* says the same), readable and writable, and a default that
// lies in its range and is what a new element holds.
TEST(Element, EveryPropertyHasABlurbRangeDefaultAndMutability) {
  GstElement* e = gst_element_factory_make("liveavatar", nullptr);
  ASSERT_NE(e, nullptr);
  guint n = 0;
  GParamSpec** specs = g_object_class_list_properties(G_OBJECT_GET_CLASS(e), &n);
  int own = 0;
  for (guint i = 0; i < n; ++i) {
    GParamSpec* p = specs[i];
    if (p->owner_type != G_OBJECT_TYPE(e)) continue;  // GstAggregator's and GstObject's
    ++own;
    const std::string name = g_param_spec_get_name(p);
    const char* nick = g_param_spec_get_nick(p);
    const char* blurb = g_param_spec_get_blurb(p);
    ASSERT_TRUE(nick && *nick) << name;
    ASSERT_TRUE(blurb && std::string(blurb).size() >= 30) << name << ": blurb too short to say what it does";
    gchar* lower = g_ascii_strdown(blurb, -1);
    const std::string b = lower;
    g_free(lower);
    EXPECT_TRUE((p->flags & G_PARAM_READABLE) && (p->flags & G_PARAM_WRITABLE)) << name;
    const bool ready = p->flags & GST_PARAM_MUTABLE_READY, playing = p->flags & GST_PARAM_MUTABLE_PLAYING,
               paused = p->flags & GST_PARAM_MUTABLE_PAUSED;
    EXPECT_EQ(ready + playing + paused, 1) << name << ": exactly one GST_PARAM_MUTABLE_* flag";
    if (ready) {
      EXPECT_NE(b.find("changeable in null/ready only"), std::string::npos) << name << ": " << blurb;
    }
    if (playing) {
      EXPECT_NE(b.find("changeable in any state"), std::string::npos) << name << ": " << blurb;
    }
    GValue def = G_VALUE_INIT, held = G_VALUE_INIT;
    g_value_init(&def, p->value_type);
    g_value_init(&held, p->value_type);
    g_param_value_set_default(p, &def);
    EXPECT_FALSE(g_param_value_validate(p, &def)) << name << ": default outside its range";
    g_object_get_property(G_OBJECT(e), name.c_str(), &held);
    EXPECT_EQ(g_param_values_cmp(p, &def, &held), 0) << name << ": a new element does not hold the default";
    if (G_IS_PARAM_SPEC_ENUM(p)) {
      GEnumClass* ec = G_PARAM_SPEC_ENUM(p)->enum_class;
      for (guint k = 0; k < ec->n_values; ++k)
        EXPECT_GE(std::string(ec->values[k].value_name).size(), 10u) << name << "=" << ec->values[k].value_nick;
    }
    g_value_unset(&def);
    g_value_unset(&held);
  }
  g_free(specs);
  EXPECT_GE(own, 13) << "the element's own properties";
  gst_object_unref(e);
}

TEST(Element, FrameCountTimestampsAndEos) {
  Avatar a;
  a.set_image(portrait().width, portrait().height);
  a.start_audio();
  // 1.01 s in 1000-sample chunks -> ceil(1.01 * 25) = 26 frames.
  const size_t total = 16160;
  for (size_t at = 0; at < total; at += 1000) {
    const size_t n = std::min<size_t>(1000, total - at);
    ASSERT_EQ(gst_harness_push(a.audio, audio_buffer(gst_util_uint64_scale(at, GST_SECOND, 16000), n)), GST_FLOW_OK);
  }
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  ASSERT_EQ(frames.size(), 26u);
  for (size_t i = 0; i < frames.size(); ++i) {
    EXPECT_EQ(GST_BUFFER_PTS(frames[i]), i * kFrame) << "frame " << i;
    EXPECT_EQ(GST_BUFFER_DURATION(frames[i]), kFrame);
  }
  GstVideoInfo info = output_info(a.audio);
  EXPECT_EQ(GST_VIDEO_INFO_FORMAT(&info), GST_VIDEO_FORMAT_RGB);
  EXPECT_EQ(GST_VIDEO_INFO_WIDTH(&info), 512);
  EXPECT_EQ(GST_VIDEO_INFO_HEIGHT(&info), 512);
  EXPECT_EQ(GST_VIDEO_INFO_FPS_N(&info), 25);
  EXPECT_EQ(GST_VIDEO_INFO_FPS_D(&info), 1);
  EXPECT_EQ(gst_buffer_get_size(frames[0]), GST_VIDEO_INFO_SIZE(&info));
  free_all(frames);
}

TEST(Element, DefaultSizeFollowsThePortraitInMultiplesOf16) {
  Avatar a;
  a.set_image(300, 200);
  a.start_audio();
  gst_harness_push(a.audio, audio_buffer(0, 640));
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  ASSERT_EQ(frames.size(), 1u);
  GstVideoInfo info = output_info(a.audio);
  EXPECT_EQ(GST_VIDEO_INFO_WIDTH(&info), 288);
  EXPECT_EQ(GST_VIDEO_INFO_HEIGHT(&info), 192);
  free_all(frames);
}

TEST(Element, WidthHeightPropertiesAndI420) {
  Avatar a("width=320 height=240");
  gst_harness_set_sink_caps_str(a.audio, "video/x-raw,format=I420");
  a.set_image(portrait().width, portrait().height);
  a.start_audio();
  gst_harness_push(a.audio, audio_buffer(0, 1280));
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  ASSERT_EQ(frames.size(), 2u);
  GstVideoInfo info = output_info(a.audio);
  EXPECT_EQ(GST_VIDEO_INFO_FORMAT(&info), GST_VIDEO_FORMAT_I420);
  EXPECT_EQ(GST_VIDEO_INFO_WIDTH(&info), 320);
  EXPECT_EQ(GST_VIDEO_INFO_HEIGHT(&info), 240);
  EXPECT_EQ(gst_buffer_get_size(frames[1]), GST_VIDEO_INFO_SIZE(&info));
  free_all(frames);
}

TEST(Element, TimestampsStartAtTheSegmentStart) {
  Avatar a;
  a.set_image(portrait().width, portrait().height);
  gst_harness_push_event(a.audio, gst_event_new_stream_start("audio"));
  gst_harness_push_event(a.audio, gst_event_new_caps(gst_caps_from_string(kAudioCaps)));
  GstSegment seg;
  gst_segment_init(&seg, GST_FORMAT_TIME);
  seg.start = seg.time = 10 * GST_SECOND;
  gst_harness_push_event(a.audio, gst_event_new_segment(&seg));
  gst_harness_push(a.audio, audio_buffer(10 * GST_SECOND, 3200));
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  ASSERT_EQ(frames.size(), 5u);
  for (size_t i = 0; i < frames.size(); ++i) EXPECT_EQ(GST_BUFFER_PTS(frames[i]), 10 * GST_SECOND + i * kFrame);
  free_all(frames);
}

TEST(Element, AudioGapIsFilledSoNothingIsLost) {
  Avatar a;
  a.set_image(portrait().width, portrait().height);
  a.start_audio();
  gst_harness_push(a.audio, audio_buffer(0, 8000));                // 0 .. 0.5 s
  gst_harness_push(a.audio, audio_buffer(GST_SECOND, 8000));       // 1.0 .. 1.5 s (0.5 s missing)
  gst_harness_push_event(a.audio, gst_event_new_gap(GST_SECOND * 3 / 2, GST_SECOND / 2));  // 1.5 .. 2.0 s
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  ASSERT_EQ(frames.size(), 50u);
  for (size_t i = 0; i < frames.size(); ++i) EXPECT_EQ(GST_BUFFER_PTS(frames[i]), i * kFrame);
  free_all(frames);
}

TEST(Element, OverlappingAudioIsNotCountedTwice) {
  Avatar a;
  a.set_image(portrait().width, portrait().height);
  a.start_audio();
  gst_harness_push(a.audio, audio_buffer(0, 8000));              // 0 .. 0.5 s
  gst_harness_push(a.audio, audio_buffer(GST_SECOND / 4, 8000)); // 0.25 .. 0.75 s: half overlaps
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  EXPECT_EQ(frames.size(), 19u);  // 0.75 s -> 18.75 -> 19 frames
  free_all(frames);
}

TEST(Element, FlushRestartsTheStream) {
  Avatar a;
  a.set_image(portrait().width, portrait().height);
  a.start_audio();
  gst_harness_push(a.audio, audio_buffer(0, 6400));
  // Wait for the 10 frames of the first stream.
  for (int i = 0; i < 10; ++i) gst_buffer_unref(gst_harness_pull(a.audio));
  gst_harness_push_event(a.audio, gst_event_new_flush_start());
  gst_harness_push_event(a.audio, gst_event_new_flush_stop(TRUE));
  GstSegment seg;
  gst_segment_init(&seg, GST_FORMAT_TIME);
  seg.start = seg.time = 5 * GST_SECOND;
  gst_harness_push_event(a.audio, gst_event_new_segment(&seg));
  gst_harness_push(a.audio, audio_buffer(5 * GST_SECOND, 1920));
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  ASSERT_EQ(frames.size(), 3u);
  for (size_t i = 0; i < frames.size(); ++i) {
    EXPECT_EQ(GST_BUFFER_PTS(frames[i]), 5 * GST_SECOND + i * kFrame);
    EXPECT_EQ(GST_BUFFER_OFFSET(frames[i]), i) << "frame numbering restarts after a flush";
  }
  free_all(frames);
}

TEST(Element, ZeroLengthAudioGivesNoFramesAndEos) {
  Avatar a;
  a.set_image(portrait().width, portrait().height);
  a.start_audio();
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  EXPECT_EQ(frames.size(), 0u);
  EXPECT_EQ(a.wait_error(0.2), "");
}

TEST(Element, LatenessIsReportedWithQosAndNoFrameIsDropped) {
  Avatar a;
  a.set_image(portrait().width, portrait().height);
  a.start_audio();
  // Downstream says buffers up to ~2 s are late.
  ASSERT_TRUE(gst_harness_push_upstream_event(
      a.audio, gst_event_new_qos(GST_QOS_TYPE_UNDERFLOW, 0.5, GST_SECOND, 0)));
  gst_harness_push(a.audio, audio_buffer(0, 16000));
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  EXPECT_EQ(frames.size(), 25u);
  int qos = 0;
  for (GstMessage* m : a.take(GST_MESSAGE_QOS)) {
    GstFormat fmt;
    guint64 processed, dropped;
    gst_message_parse_qos_stats(m, &fmt, &processed, &dropped);
    EXPECT_EQ(dropped, 0u);
    ++qos;
    gst_message_unref(m);
  }
  EXPECT_EQ(qos, 25) << "every frame ends before 2 s: all reported late";
  free_all(frames);
}

TEST(Element, GrayRgbaAndI420ImagesWork) {
  for (GstVideoFormat fmt : {GST_VIDEO_FORMAT_GRAY8, GST_VIDEO_FORMAT_RGBA, GST_VIDEO_FORMAT_BGRx,
                             GST_VIDEO_FORMAT_I420}) {
    Avatar a;
    a.set_image(160, 120, fmt);
    a.start_audio();
    gst_harness_push(a.audio, audio_buffer(0, 1600));
    gst_harness_push_event(a.audio, gst_event_new_eos());
    auto frames = a.pull_all();
    EXPECT_EQ(frames.size(), 3u) << gst_video_format_to_string(fmt);
    free_all(frames);
  }
}

TEST(Element, TinyImageIsAClearError) {
  Avatar a;
  a.set_image(32, 32);
  a.start_audio();
  gst_harness_push(a.audio, audio_buffer(0, 640));
  const std::string err = a.wait_error();
  EXPECT_NE(err.find("too small"), std::string::npos) << err;
}

TEST(Element, ImageStreamWithoutPictureIsAClearError) {
  Avatar a;
  gst_harness_set_src_caps_str(a.image, "video/x-raw,format=RGB,width=64,height=64,framerate=0/1");
  gst_harness_push_event(a.image, gst_event_new_eos());
  a.start_audio();
  gst_harness_push(a.audio, audio_buffer(0, 640));
  const std::string err = a.wait_error();
  EXPECT_NE(err.find("without a picture"), std::string::npos) << err;
}

TEST(Element, UnlinkedImagePadIsAClearError) {
  Avatar a(nullptr, /*link_image=*/false);
  a.start_audio();
  gst_harness_push_event(a.audio, gst_event_new_eos());
  const std::string err = a.wait_error();
  EXPECT_NE(err.find("image pad is not linked"), std::string::npos) << err;
}

TEST(Element, UnsupportedAudioCapsSayWhatToAdd) {
  Avatar a;
  a.set_image(portrait().width, portrait().height);
  gst_harness_set_src_caps_str(a.audio, "audio/x-raw,format=S16LE,rate=44100,channels=2,layout=interleaved");
  bool advised = false;
  for (GstMessage* m : a.take(GST_MESSAGE_WARNING)) {
    GError* err = nullptr;
    gst_message_parse_warning(m, &err, nullptr);
    advised |= std::string(err->message).find("audioconvert ! audioresample") != std::string::npos;
    g_error_free(err);
    gst_message_unref(m);
  }
  EXPECT_TRUE(advised);
}

TEST(Element, BadMouthBoxFailsTheStateChange) {
  GstElement* e = gst_element_factory_make("liveavatar", nullptr);
  g_object_set(e, "mouth-box", "1,2,three", nullptr);
  GstBus* bus = gst_bus_new();
  gst_element_set_bus(e, bus);
  EXPECT_EQ(gst_element_set_state(e, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  GstMessage* m = gst_bus_pop_filtered(bus, GST_MESSAGE_ERROR);
  ASSERT_NE(m, nullptr);
  gst_message_unref(m);
  gst_element_set_state(e, GST_STATE_NULL);
  gst_object_unref(bus);
  gst_object_unref(e);
}

// max-area shapes the model: it changes in NULL or READY only (the engine is made at READY->PAUSED).
TEST(Element, MaxAreaChangesOnlyInNullOrReady) {
  GstElement* e = gst_element_factory_make("liveavatar", nullptr);
  ASSERT_NE(e, nullptr);
  guint area = 0;
  g_object_get(e, "max-area", &area, nullptr);
  EXPECT_EQ(area, 704u * 384u);
  g_object_set(e, "max-area", 128 * 128, nullptr);
  ASSERT_NE(gst_element_set_state(e, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  g_object_set(e, "max-area", 64 * 64, nullptr);
  g_object_get(e, "max-area", &area, nullptr);
  EXPECT_EQ(area, 128u * 128u) << "ignored in PAUSED";
  gst_element_set_state(e, GST_STATE_NULL);
  g_object_set(e, "max-area", 64 * 64, nullptr);
  g_object_get(e, "max-area", &area, nullptr);
  EXPECT_EQ(area, 64u * 64u);
  gst_object_unref(e);
}

TEST(Element, NewImageReplacesTheReference) {
  Avatar a;
  a.set_image(portrait().width, portrait().height, GST_VIDEO_FORMAT_RGB, /*eos=*/false);
  a.start_audio();
  gst_harness_push(a.audio, audio_buffer(0, 640));
  GstBuffer* first = gst_harness_pull(a.audio);
  // A flat grey picture due at 40 ms replaces the portrait for the frames after it.
  GstBuffer* grey = image_buffer(portrait().width, portrait().height, GST_VIDEO_FORMAT_RGB, 90);
  GST_BUFFER_PTS(grey) = kFrame;
  gst_harness_push(a.image, grey);
  gst_harness_push_event(a.image, gst_event_new_eos());
  gst_harness_push(a.audio, audio_buffer(kFrame, 640));
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto rest = a.pull_all();
  ASSERT_EQ(rest.size(), 1u);
  GstMapInfo m1, m2;
  gst_buffer_map(first, &m1, GST_MAP_READ);
  gst_buffer_map(rest[0], &m2, GST_MAP_READ);
  int grey_px = 0;
  for (gsize i = 0; i < m2.size; i += 3) grey_px += m2.data[i] == 90 && m2.data[i + 1] == 90;
  EXPECT_GT(grey_px, static_cast<int>(m2.size / 3 * 9 / 10)) << "second frame shows the new picture";
  EXPECT_NE(memcmp(m1.data, m2.data, m1.size), 0);
  gst_buffer_unmap(first, &m1);
  gst_buffer_unmap(rest[0], &m2);
  gst_buffer_unref(first);
  free_all(rest);
}

// Share of the pixels of an RGB frame that are exactly (v, v, v).
double flat_share(GstBuffer* frame, guint8 v) {
  GstMapInfo m;
  gst_buffer_map(frame, &m, GST_MAP_READ);
  size_t n = 0;
  for (gsize i = 0; i + 2 < m.size; i += 3) n += m.data[i] == v && m.data[i + 1] == v && m.data[i + 2] == v;
  const double share = static_cast<double>(n) / static_cast<double>(m.size / 3);
  gst_buffer_unmap(frame, &m);
  return share;
}

// Pictures queued ahead of the audio take effect at their own timestamps: the portrait for 0-4 s, flat grey 90 for
// 4-8 s, flat grey 200 from 8 s, although the audio comes in 3 s buffers that each complete 75 frames.
TEST(Element, TimedPicturesTakeEffectAtTheirOwnFrame) {
  Avatar a("width=128 height=128");
  gst_harness_set_src_caps_str(a.image, "video/x-raw,format=RGB,width=512,height=512,framerate=0/1");
  std::thread pictures([&] {
    const guint8 fills[] = {0, 90, 200};
    for (int i = 0; i < 3; ++i) {
      GstBuffer* b = image_buffer(512, 512, GST_VIDEO_FORMAT_RGB, fills[i], i == 0 ? &portrait() : nullptr);
      GST_BUFFER_PTS(b) = i * 4 * GST_SECOND;
      GST_BUFFER_DURATION(b) = 4 * GST_SECOND;
      gst_harness_push(a.image, b);  // blocks until the element takes the previous picture
    }
    gst_harness_push_event(a.image, gst_event_new_eos());
  });
  a.start_audio();
  for (int s = 0; s < 10; s += 3) {
    const size_t n = std::min(3, 10 - s) * 16000;
    ASSERT_EQ(gst_harness_push(a.audio, audio_buffer(s * GST_SECOND, n)), GST_FLOW_OK);
  }
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  pictures.join();
  ASSERT_EQ(frames.size(), 250u);
  for (size_t i : {0, 50, 99}) {
    EXPECT_LT(flat_share(frames[i], 90), 0.5) << "frame " << i << " shows the portrait";
    EXPECT_LT(flat_share(frames[i], 200), 0.5) << "frame " << i << " shows the portrait";
  }
  for (size_t i : {100, 150, 199}) EXPECT_GT(flat_share(frames[i], 90), 0.9) << "frame " << i << " shows grey 90";
  for (size_t i : {200, 249}) EXPECT_GT(flat_share(frames[i], 200), 0.9) << "frame " << i << " shows grey 200";
  free_all(frames);
}

// A moving picture without a face (each frame a different flat grey) earns one "no face" warning, not one a frame.
TEST(Element, NoFaceWarningOnceForAMovingPicture) {
  Avatar a("width=128 height=128");
  gst_harness_set_src_caps_str(a.image, "video/x-raw,format=RGB,width=256,height=256,framerate=25/1");
  std::thread pictures([&] {
    for (int i = 0; i < 10; ++i) {
      GstBuffer* b = image_buffer(256, 256, GST_VIDEO_FORMAT_RGB, static_cast<guint8>(60 + 10 * i));
      GST_BUFFER_PTS(b) = i * kFrame;
      GST_BUFFER_DURATION(b) = kFrame;
      gst_harness_push(a.image, b);
    }
    gst_harness_push_event(a.image, gst_event_new_eos());
  });
  a.start_audio();
  ASSERT_EQ(gst_harness_push(a.audio, audio_buffer(0, 6400)), GST_FLOW_OK);
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  pictures.join();
  ASSERT_EQ(frames.size(), 10u);
  EXPECT_GT(flat_share(frames[9], 150), 0.9) << "the last frame shows the last picture";
  int no_face = 0;
  for (GstMessage* m : a.take(GST_MESSAGE_WARNING)) {
    GError* err = nullptr;
    gst_message_parse_warning(m, &err, nullptr);
    no_face += std::string(err->message).find("no face found") != std::string::npos;
    g_error_free(err);
    gst_message_unref(m);
  }
  EXPECT_EQ(no_face, 1);
  free_all(frames);
}

// Both sink pads flush with one seqnum, as for a seek that the image branch carries out too (imagefreeze): the
// element restarts the stream at the new segment with the same portrait.
TEST(Element, FlushOnBothPadsRestartsTheStream) {
  Avatar a;
  a.set_image(portrait().width, portrait().height);
  a.start_audio();
  gst_harness_push(a.audio, audio_buffer(0, 6400));
  for (int i = 0; i < 10; ++i) gst_buffer_unref(gst_harness_pull(a.audio));
  const guint32 seqnum = gst_util_seqnum_next();
  for (GstHarness* h : {a.image, a.audio}) {
    GstEvent* e = gst_event_new_flush_start();
    gst_event_set_seqnum(e, seqnum);
    gst_harness_push_event(h, e);
  }
  for (GstHarness* h : {a.image, a.audio}) {
    GstEvent* e = gst_event_new_flush_stop(TRUE);
    gst_event_set_seqnum(e, seqnum);
    gst_harness_push_event(h, e);
  }
  GstSegment seg;
  gst_segment_init(&seg, GST_FORMAT_TIME);
  seg.start = seg.time = 5 * GST_SECOND;
  gst_harness_push_event(a.image, gst_event_new_segment(&seg));
  gst_harness_push_event(a.image, gst_event_new_eos());  // the still picture is not sent again
  gst_harness_push_event(a.audio, gst_event_new_segment(&seg));
  gst_harness_push(a.audio, audio_buffer(5 * GST_SECOND, 1920));
  gst_harness_push_event(a.audio, gst_event_new_eos());
  auto frames = a.pull_all();
  EXPECT_EQ(a.wait_error(0.1), "");
  ASSERT_EQ(frames.size(), 3u);
  for (size_t i = 0; i < frames.size(); ++i) EXPECT_EQ(GST_BUFFER_PTS(frames[i]), 5 * GST_SECOND + i * kFrame);
  free_all(frames);
}

// Live: frames follow the clock, latency is reported, and when the audio stops (without EOS) the avatar keeps
// going with idle frames instead of stalling; nothing is duplicated or skipped.
TEST(ElementLive, IdlesWhenAudioIsLateAndStaysContiguous) {
  GError* err = nullptr;
  GstElement* pipe = gst_parse_launch(
      "appsrc name=img format=time ! videoconvert ! la.image "
      "appsrc name=aud is-live=true format=time ! la.audio "
      "liveavatar name=la width=128 height=128 ! appsink name=out sync=true max-buffers=1000",
      &err);
  ASSERT_EQ(err, nullptr) << (err ? err->message : "");
  GstElement* img = gst_bin_get_by_name(GST_BIN(pipe), "img");
  GstElement* aud = gst_bin_get_by_name(GST_BIN(pipe), "aud");
  GstElement* out = gst_bin_get_by_name(GST_BIN(pipe), "out");
  GstCaps* icaps = gst_caps_from_string("video/x-raw,format=RGB,width=512,height=512,framerate=0/1");
  GstCaps* acaps = gst_caps_from_string(kAudioCaps);
  gst_app_src_set_caps(GST_APP_SRC(img), icaps);
  gst_app_src_set_caps(GST_APP_SRC(aud), acaps);
  gst_caps_unref(icaps);
  gst_caps_unref(acaps);
  gst_app_src_push_buffer(GST_APP_SRC(img), image_buffer(512, 512, GST_VIDEO_FORMAT_RGB, 0, &portrait()));
  gst_app_src_end_of_stream(GST_APP_SRC(img));
  ASSERT_NE(gst_element_set_state(pipe, GST_STATE_PLAYING), GST_STATE_CHANGE_FAILURE);

  // 0.4 s of speech now, then nothing for a while (late audio), then 0.4 s at 2.0 s and EOS.
  for (int i = 0; i < 4; ++i)
    gst_app_src_push_buffer(GST_APP_SRC(aud), audio_buffer(i * GST_SECOND / 10, 1600));
  std::vector<GstClockTime> pts;
  auto pull_for = [&](double seconds) {
    const gint64 until = g_get_monotonic_time() + static_cast<gint64>(seconds * 1e6);
    while (g_get_monotonic_time() < until) {
      GstSample* s = gst_app_sink_try_pull_sample(GST_APP_SINK(out), 20 * GST_MSECOND);
      if (!s) {
        if (gst_app_sink_is_eos(GST_APP_SINK(out))) return;
        continue;
      }
      pts.push_back(GST_BUFFER_PTS(gst_sample_get_buffer(s)));
      gst_sample_unref(s);
    }
  };
  pull_for(1.5);
  const size_t during_gap = pts.size();
  EXPECT_GE(during_gap, 25u) << "frames kept coming while the audio was late";

  GstQuery* q = gst_query_new_latency();
  ASSERT_TRUE(gst_element_query(pipe, q));
  gboolean live;
  GstClockTime min_lat;
  gst_query_parse_latency(q, &live, &min_lat, nullptr);
  gst_query_unref(q);
  EXPECT_TRUE(live);
  EXPECT_GE(min_lat, kFrame);

  for (int i = 0; i < 4; ++i)
    gst_app_src_push_buffer(GST_APP_SRC(aud), audio_buffer(2 * GST_SECOND + i * GST_SECOND / 10, 1600));
  gst_app_src_end_of_stream(GST_APP_SRC(aud));
  pull_for(4.0);
  ASSERT_GE(pts.size(), 60u);
  const GstClockTime first = pts[0];
  for (size_t i = 0; i < pts.size(); ++i) ASSERT_EQ(pts[i], first + i * kFrame) << "frame " << i;
  EXPECT_EQ(pts.back() + kFrame, 2 * GST_SECOND + 4 * GST_SECOND / 10) << "the video ends with the audio";

  gst_element_set_state(pipe, GST_STATE_NULL);
  gst_object_unref(img);
  gst_object_unref(aud);
  gst_object_unref(out);
  gst_object_unref(pipe);
}

// Live with a portrait and no audio at all yet: the avatar idles from the start instead of waiting.
TEST(ElementLive, IdlesBeforeAnyAudio) {
  GError* err = nullptr;
  GstElement* pipe = gst_parse_launch(
      "appsrc name=img format=time ! videoconvert ! la.image "
      "appsrc name=aud is-live=true format=time caps=audio/x-raw,format=F32LE,rate=16000,channels=1,"
      "layout=interleaved ! la.audio "
      "liveavatar name=la width=128 height=128 ! appsink name=out sync=true max-buffers=1000",
      &err);
  ASSERT_EQ(err, nullptr) << (err ? err->message : "");
  GstElement* img = gst_bin_get_by_name(GST_BIN(pipe), "img");
  GstElement* out = gst_bin_get_by_name(GST_BIN(pipe), "out");
  GstCaps* icaps = gst_caps_from_string("video/x-raw,format=RGB,width=512,height=512,framerate=0/1");
  gst_app_src_set_caps(GST_APP_SRC(img), icaps);
  gst_caps_unref(icaps);
  gst_app_src_push_buffer(GST_APP_SRC(img), image_buffer(512, 512, GST_VIDEO_FORMAT_RGB, 0, &portrait()));
  gst_app_src_end_of_stream(GST_APP_SRC(img));
  ASSERT_NE(gst_element_set_state(pipe, GST_STATE_PLAYING), GST_STATE_CHANGE_FAILURE);
  std::vector<GstClockTime> pts;
  const gint64 until = g_get_monotonic_time() + 1200000;
  while (g_get_monotonic_time() < until) {
    GstSample* s = gst_app_sink_try_pull_sample(GST_APP_SINK(out), 20 * GST_MSECOND);
    if (!s) continue;
    pts.push_back(GST_BUFFER_PTS(gst_sample_get_buffer(s)));
    gst_sample_unref(s);
  }
  EXPECT_GE(pts.size(), 20u) << "about 25 idle frames a second";
  for (size_t i = 1; i < pts.size(); ++i) EXPECT_EQ(pts[i], pts[0] + i * kFrame);
  gst_element_set_state(pipe, GST_STATE_NULL);
  gst_object_unref(img);
  gst_object_unref(out);
  gst_object_unref(pipe);
}

// Live, pictures queued before any audio: each takes effect at its own time (the portrait until 1 s, then grey 90),
// not the newest of them at once.
TEST(ElementLive, PicturesAheadOfTheAudioKeepTheirTimes) {
  GError* err = nullptr;
  GstElement* pipe = gst_parse_launch(
      "appsrc name=img format=time ! videoconvert ! la.image "
      "appsrc name=aud is-live=true format=time caps=audio/x-raw,format=F32LE,rate=16000,channels=1,"
      "layout=interleaved ! la.audio "
      "liveavatar name=la width=128 height=128 ! appsink name=out sync=true max-buffers=1000",
      &err);
  ASSERT_EQ(err, nullptr) << (err ? err->message : "");
  GstElement* img = gst_bin_get_by_name(GST_BIN(pipe), "img");
  GstElement* out = gst_bin_get_by_name(GST_BIN(pipe), "out");
  GstCaps* icaps = gst_caps_from_string("video/x-raw,format=RGB,width=512,height=512,framerate=0/1");
  gst_app_src_set_caps(GST_APP_SRC(img), icaps);
  gst_caps_unref(icaps);
  gst_app_src_push_buffer(GST_APP_SRC(img), image_buffer(512, 512, GST_VIDEO_FORMAT_RGB, 0, &portrait()));
  GstBuffer* grey = image_buffer(512, 512, GST_VIDEO_FORMAT_RGB, 90);
  GST_BUFFER_PTS(grey) = GST_SECOND;
  gst_app_src_push_buffer(GST_APP_SRC(img), grey);
  gst_app_src_end_of_stream(GST_APP_SRC(img));
  ASSERT_NE(gst_element_set_state(pipe, GST_STATE_PLAYING), GST_STATE_CHANGE_FAILURE);
  std::vector<GstBuffer*> frames;
  const gint64 until = g_get_monotonic_time() + 1600000;
  while (g_get_monotonic_time() < until) {
    GstSample* s = gst_app_sink_try_pull_sample(GST_APP_SINK(out), 20 * GST_MSECOND);
    if (!s) continue;
    frames.push_back(gst_buffer_ref(gst_sample_get_buffer(s)));
    gst_sample_unref(s);
  }
  gst_element_set_state(pipe, GST_STATE_NULL);
  ASSERT_GE(frames.size(), 20u);
  int portrait_frames = 0, grey_frames = 0;
  for (GstBuffer* f : frames) {
    const bool is_grey = flat_share(f, 90) > 0.9;
    if (GST_BUFFER_PTS(f) + kFrame <= GST_SECOND) {
      EXPECT_FALSE(is_grey) << "frame at " << GST_BUFFER_PTS(f) << " ns shows the 1 s picture early";
      ++portrait_frames;
    } else if (GST_BUFFER_PTS(f) >= GST_SECOND) {
      EXPECT_TRUE(is_grey) << "frame at " << GST_BUFFER_PTS(f) << " ns";
      ++grey_frames;
    }
  }
  EXPECT_GT(portrait_frames, 0);
  EXPECT_GT(grey_frames, 0);
  free_all(frames);
  gst_object_unref(img);
  gst_object_unref(out);
  gst_object_unref(pipe);
}

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
