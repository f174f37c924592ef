// Seeks through real pipelines on the example assets, with both image branches the README shows: a still-picture
// decoder (pngdec, which refuses seeks) and imagefreeze (which does them itself). After a seek the stream restarts at
// the new position with exact frame counts and timestamps; a seek the audio cannot do fails and playback goes on.
#include <gst/app/gstappsink.h>
#include <gst/app/gstappsrc.h>
#include <gst/gst.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

namespace {

constexpr GstClockTime kFrame = GST_SECOND / 25;
constexpr guint64 kSpeechSamples = 440828;  // examples/assets/speech.wav: 16 kHz mono, 27.55 s

std::string asset(const char* name) { return std::string(LIVEAVATAR_ASSETS_DIR) + "/" + name; }

// The image branches of the README and the pipelines: a still-picture decoder (pngdec, or whatever decodebin picks
// for a PNG), or imagefreeze after it.
enum class Image { kPngdec, kDecodebin, kImagefreeze };

std::string image_branch(Image kind) {
  const std::string file = "filesrc location=" + asset("portrait.png");
  switch (kind) {
    case Image::kPngdec:
      return file + " ! pngdec ! videoconvert ! la.image ";
    case Image::kDecodebin:
      return file + " ! decodebin ! videoconvert ! la.image ";
    case Image::kImagefreeze:
      break;
  }
  return file + " ! decodebin ! videoconvert ! imagefreeze ! la.image ";
}

std::string wav_branch() {
  return "filesrc location=" + asset("speech.wav") + " ! wavparse ! audioconvert ! audioresample ! la.audio ";
}

// Frames that cover [from_sample, to_sample) of the speech: ceil(samples / 640).
size_t frames_for(guint64 from_sample, guint64 to_sample) { return (to_sample - from_sample + 639) / 640; }

struct Pipeline {
  GstElement* pipe = nullptr;
  GstElement* out = nullptr;
  GstBus* bus = nullptr;

  explicit Pipeline(const std::string& branches) {
    GError* err = nullptr;
    pipe = gst_parse_launch((branches + "liveavatar name=la width=128 height=128 ! appsink name=out sync=false "
                                        "max-buffers=8")
                                .c_str(),
                            &err);
    EXPECT_EQ(err, nullptr) << (err ? err->message : "");
    if (err) g_error_free(err);
    out = gst_bin_get_by_name(GST_BIN(pipe), "out");
    bus = gst_element_get_bus(pipe);
  }
  ~Pipeline() {
    gst_element_set_state(pipe, GST_STATE_NULL);
    gst_object_unref(bus);
    gst_object_unref(out);
    gst_object_unref(pipe);
  }

  // Waits for a state change to complete (preroll, or a flushing seek's new preroll).
  bool settle(GstState want) {
    GstState state = GST_STATE_VOID_PENDING;
    const GstStateChangeReturn ret = gst_element_get_state(pipe, &state, nullptr, 20 * GST_SECOND);
    return (ret == GST_STATE_CHANGE_SUCCESS || ret == GST_STATE_CHANGE_NO_PREROLL) && state == want;
  }

  std::string error() {
    GstMessage* m = gst_bus_pop_filtered(bus, GST_MESSAGE_ERROR);
    if (!m) return "";
    GError* err = nullptr;
    gst_message_parse_error(m, &err, nullptr);
    std::string text = err->message;
    g_error_free(err);
    gst_message_unref(m);
    return text;
  }

  // Pulls frames (and serialized events) until EOS, a SEGMENT_DONE event, `max_frames` frames, an error, or 60 s.
  struct Pulled {
    std::vector<GstClockTime> pts;
    bool eos = false;
    bool segment_done = false;
    std::string error;
  };
  Pulled pull(size_t max_frames = SIZE_MAX) {
    Pulled p;
    const gint64 until = g_get_monotonic_time() + 60 * G_USEC_PER_SEC;
    while (p.pts.size() < max_frames && g_get_monotonic_time() < until) {
      GstMiniObject* obj = gst_app_sink_try_pull_object(GST_APP_SINK(out), 50 * GST_MSECOND);
      if (obj && GST_IS_SAMPLE(obj)) {
        p.pts.push_back(GST_BUFFER_PTS(gst_sample_get_buffer(GST_SAMPLE(obj))));
      } else if (obj && GST_IS_EVENT(obj) && GST_EVENT_TYPE(GST_EVENT(obj)) == GST_EVENT_SEGMENT_DONE) {
        p.segment_done = true;
      }
      if (obj) gst_mini_object_unref(obj);
      if (p.segment_done) break;
      if (!obj && gst_app_sink_is_eos(GST_APP_SINK(out))) {
        p.eos = true;
        break;
      }
      p.error = error();
      if (!p.error.empty()) break;
    }
    return p;
  }
};

// Frame i of `pts` is stamped start + i x 40 ms.
void expect_contiguous_from(const std::vector<GstClockTime>& pts, GstClockTime start) {
  for (size_t i = 0; i < pts.size(); ++i)
    ASSERT_EQ(pts[i], start + i * kFrame) << "frame " << i << " of " << pts.size();
}

class Seek : public ::testing::TestWithParam<Image> {};

std::string branch_name(const ::testing::TestParamInfo<Image>& info) {
  switch (info.param) {
    case Image::kPngdec:
      return "Pngdec";
    case Image::kDecodebin:
      return "Decodebin";
    case Image::kImagefreeze:
      break;
  }
  return "Imagefreeze";
}

// A flushing seek in PAUSED: the new preroll and then the rest of the speech from 25 s, frame for frame.
TEST_P(Seek, InPausedRestartsAtTheNewPosition) {
  Pipeline p(image_branch(GetParam()) + wav_branch());
  ASSERT_NE(gst_element_set_state(p.pipe, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  ASSERT_TRUE(p.settle(GST_STATE_PAUSED)) << p.error();
  ASSERT_TRUE(gst_element_seek_simple(p.pipe, GST_FORMAT_TIME,
                                      static_cast<GstSeekFlags>(GST_SEEK_FLAG_FLUSH | GST_SEEK_FLAG_ACCURATE),
                                      25 * GST_SECOND));
  ASSERT_TRUE(p.settle(GST_STATE_PAUSED)) << "no preroll after the seek " << p.error();
  ASSERT_NE(gst_element_set_state(p.pipe, GST_STATE_PLAYING), GST_STATE_CHANGE_FAILURE);
  const auto got = p.pull();
  ASSERT_EQ(got.error, "");
  ASSERT_TRUE(got.eos);
  ASSERT_EQ(got.pts.size(), frames_for(25 * 16000, kSpeechSamples));
  expect_contiguous_from(got.pts, 25 * GST_SECOND);
}

// A flushing seek while playing: the frames before it are dropped by the flush, the ones after it start at 25 s.
TEST_P(Seek, WhilePlayingRestartsAtTheNewPosition) {
  Pipeline p(image_branch(GetParam()) + wav_branch());
  ASSERT_NE(gst_element_set_state(p.pipe, GST_STATE_PLAYING), GST_STATE_CHANGE_FAILURE);
  const auto before = p.pull(10);
  ASSERT_EQ(before.error, "");
  ASSERT_EQ(before.pts.size(), 10u);
  expect_contiguous_from(before.pts, 0);
  ASSERT_TRUE(gst_element_seek_simple(p.pipe, GST_FORMAT_TIME,
                                      static_cast<GstSeekFlags>(GST_SEEK_FLAG_FLUSH | GST_SEEK_FLAG_ACCURATE),
                                      25 * GST_SECOND));
  const auto after = p.pull();
  ASSERT_EQ(after.error, "");
  ASSERT_TRUE(after.eos);
  ASSERT_EQ(after.pts.size(), frames_for(25 * 16000, kSpeechSamples));
  expect_contiguous_from(after.pts, 25 * GST_SECOND);
}

// A segment seek [2 s, 3.01 s]: 26 frames (the last one covers the 10 ms tail), then SEGMENT_DONE; then the same
// segment again without flushing, as a player loops it.
TEST_P(Seek, SegmentSeekEndsWithTheSegmentsAudio) {
  Pipeline p(image_branch(GetParam()) + wav_branch());
  ASSERT_NE(gst_element_set_state(p.pipe, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  ASSERT_TRUE(p.settle(GST_STATE_PAUSED)) << p.error();
  ASSERT_TRUE(gst_element_seek(p.pipe, 1.0, GST_FORMAT_TIME,
                               static_cast<GstSeekFlags>(GST_SEEK_FLAG_FLUSH | GST_SEEK_FLAG_SEGMENT |
                                                         GST_SEEK_FLAG_ACCURATE),
                               GST_SEEK_TYPE_SET, 2 * GST_SECOND, GST_SEEK_TYPE_SET, 3010 * GST_MSECOND));
  ASSERT_TRUE(p.settle(GST_STATE_PAUSED)) << p.error();
  ASSERT_NE(gst_element_set_state(p.pipe, GST_STATE_PLAYING), GST_STATE_CHANGE_FAILURE);
  const auto got = p.pull();
  ASSERT_EQ(got.error, "");
  ASSERT_TRUE(got.segment_done);
  ASSERT_EQ(got.pts.size(), frames_for(2 * 16000, 3010 * 16));
  expect_contiguous_from(got.pts, 2 * GST_SECOND);
  // Looping: a non-flushing segment seek plays the same 26 frames again.
  ASSERT_TRUE(gst_element_seek(p.pipe, 1.0, GST_FORMAT_TIME,
                               static_cast<GstSeekFlags>(GST_SEEK_FLAG_SEGMENT | GST_SEEK_FLAG_ACCURATE),
                               GST_SEEK_TYPE_SET, 2 * GST_SECOND, GST_SEEK_TYPE_SET, 3010 * GST_MSECOND));
  const auto again = p.pull();
  ASSERT_EQ(again.error, "");
  ASSERT_TRUE(again.segment_done);
  ASSERT_EQ(again.pts.size(), frames_for(2 * 16000, 3010 * 16));
  expect_contiguous_from(again.pts, 2 * GST_SECOND);
}

// The duration is the audio's, whatever the image branch says (imagefreeze: endless).
TEST_P(Seek, DurationIsTheAudios) {
  Pipeline p(image_branch(GetParam()) + wav_branch());
  ASSERT_NE(gst_element_set_state(p.pipe, GST_STATE_PAUSED), GST_STATE_CHANGE_FAILURE);
  ASSERT_TRUE(p.settle(GST_STATE_PAUSED)) << p.error();
  gint64 duration = -1;
  ASSERT_TRUE(gst_element_query_duration(p.pipe, GST_FORMAT_TIME, &duration));
  EXPECT_EQ(duration, static_cast<gint64>(gst_util_uint64_scale(kSpeechSamples, GST_SECOND, 16000)));
}

INSTANTIATE_TEST_SUITE_P(ImageBranches, Seek,
                         ::testing::Values(Image::kPngdec, Image::kDecodebin, Image::kImagefreeze), branch_name);

// Audio from a source that cannot seek: the seek fails, nothing is flushed, and the stream goes on to the end.
TEST(SeekRefused, AudioThatCannotSeekKeepsPlaying) {
  Pipeline p(image_branch(Image::kPngdec) +
             "appsrc name=aud format=time stream-type=stream "
             "caps=audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved ! la.audio ");
  GstElement* aud = gst_bin_get_by_name(GST_BIN(p.pipe), "aud");
  auto push_second = [&](int second) {
    GstBuffer* b = gst_buffer_new_allocate(nullptr, 16000 * sizeof(float), nullptr);
    gst_buffer_memset(b, 0, 0, 16000 * sizeof(float));
    GST_BUFFER_PTS(b) = second * GST_SECOND;
    GST_BUFFER_DURATION(b) = GST_SECOND;
    return gst_app_src_push_buffer(GST_APP_SRC(aud), b);
  };
  ASSERT_NE(gst_element_set_state(p.pipe, GST_STATE_PLAYING), GST_STATE_CHANGE_FAILURE);
  ASSERT_EQ(push_second(0), GST_FLOW_OK);
  const auto first = p.pull(10);
  ASSERT_EQ(first.pts.size(), 10u) << first.error;
  EXPECT_FALSE(gst_element_seek_simple(p.pipe, GST_FORMAT_TIME, GST_SEEK_FLAG_FLUSH, 5 * GST_SECOND));
  ASSERT_EQ(push_second(1), GST_FLOW_OK);
  gst_app_src_end_of_stream(GST_APP_SRC(aud));
  auto rest = p.pull();
  ASSERT_EQ(rest.error, "");
  ASSERT_TRUE(rest.eos);
  std::vector<GstClockTime> all = first.pts;
  all.insert(all.end(), rest.pts.begin(), rest.pts.end());
  ASSERT_EQ(all.size(), 50u) << "2 s of audio, none of it lost or repeated";
  expect_contiguous_from(all, 0);
  gst_object_unref(aud);
}

}  // namespace

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
