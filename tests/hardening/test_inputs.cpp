// Regression tests for what tests/fuzz/element_fuzzer.cpp found in the element's input handling (each also kept as a
// seed in tests/fuzz/corpus/element_fuzzer/regress-*): segments that are not forward TIME segments, and a GAP event
// after a flush with no new segment, used to trip GLib criticals inside GstAggregator (fatal here: G_DEBUG).
#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gtest/gtest.h>

#include <string>

namespace {

constexpr GstClockTime kFrame = GST_SECOND / 25;

struct Avatar {
  GstElement* e = nullptr;
  GstHarness* audio = nullptr;
  GstHarness* image = nullptr;
  GstBus* bus = nullptr;
  Avatar() {
    e = gst_element_factory_make("liveavatar", nullptr);
    EXPECT_NE(e, nullptr);
    bus = gst_bus_new();
    gst_element_set_bus(e, bus);
    audio = gst_harness_new_with_element(e, "audio", "src");
    image = gst_harness_new_with_element(e, "image", nullptr);
    gst_harness_set_live(audio, FALSE);
    gst_harness_set_live(image, FALSE);
    gst_harness_play(audio);
    gst_harness_set_src_caps_str(image, "video/x-raw,format=RGB,width=128,height=128,framerate=0/1");
    GstBuffer* picture = gst_buffer_new_allocate(nullptr, 128 * 128 * 3, nullptr);
    gst_buffer_memset(picture, 0, 100, 128 * 128 * 3);
    GST_BUFFER_PTS(picture) = 0;
    gst_harness_push(image, picture);
    gst_harness_push_event(image, gst_event_new_eos());
    gst_harness_set_src_caps_str(audio, "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved");
  }
  ~Avatar() {
    gst_harness_teardown(image);
    gst_harness_teardown(audio);
    gst_object_unref(e);
    gst_object_unref(bus);
  }
  std::string error(GstClockTime wait = 5 * GST_SECOND) {
    GstMessage* m = gst_bus_timed_pop_filtered(bus, wait, GST_MESSAGE_ERROR);
    if (!m) return "";
    GError* err = nullptr;
    gst_message_parse_error(m, &err, nullptr);
    std::string text = err->message;
    g_error_free(err);
    gst_message_unref(m);
    return text;
  }
  GstBuffer* silence(GstClockTime pts, size_t n) {
    GstBuffer* b = gst_buffer_new_allocate(nullptr, n * sizeof(float), nullptr);
    gst_buffer_memset(b, 0, 0, n * sizeof(float));
    GST_BUFFER_PTS(b) = pts;
    GST_BUFFER_DURATION(b) = gst_util_uint64_scale(n, GST_SECOND, 16000);
    return b;
  }
};

TEST(Inputs, SegmentInBytesIsAClearError) {
  Avatar a;
  GstSegment seg;
  gst_segment_init(&seg, GST_FORMAT_BYTES);
  gst_harness_push_event(a.audio, gst_event_new_segment(&seg));  // true: the harness keeps it (sticky)
  EXPECT_EQ(a.error(), "The audio pad needs a forward segment in time, got one in bytes at rate 1.");
}

TEST(Inputs, ReversePlaybackIsAClearError) {
  Avatar a;
  GstSegment seg;
  gst_segment_init(&seg, GST_FORMAT_TIME);
  seg.rate = -1.0;
  gst_harness_push_event(a.audio, gst_event_new_segment(&seg));  // true: the harness keeps it (sticky)
  EXPECT_EQ(a.error(), "The audio pad needs a forward segment in time, got one in time at rate -1.");
}

// A flush, then a GAP before the new segment: dropped (it has no time to be in); the stream that follows is whole.
TEST(Inputs, GapAfterAFlushWithoutSegmentIsDropped) {
  Avatar a;
  ASSERT_EQ(gst_harness_push(a.audio, a.silence(0, 1280)), GST_FLOW_OK);
  for (int i = 0; i < 2; ++i) gst_buffer_unref(gst_harness_pull(a.audio));
  gst_harness_push_event(a.audio, gst_event_new_flush_start());
  gst_harness_push_event(a.audio, gst_event_new_flush_stop(/*reset_time=*/TRUE));
  gst_harness_push_event(a.audio, gst_event_new_gap(0, GST_SECOND));
  GstSegment seg;
  gst_segment_init(&seg, GST_FORMAT_TIME);
  gst_harness_push_event(a.audio, gst_event_new_segment(&seg));
  ASSERT_EQ(gst_harness_push(a.audio, a.silence(0, 3200)), GST_FLOW_OK);
  gst_harness_push_event(a.audio, gst_event_new_eos());
  for (int i = 0; i < 5; ++i) {
    GstBuffer* b = gst_harness_pull(a.audio);
    ASSERT_NE(b, nullptr) << "frame " << i;
    EXPECT_EQ(GST_BUFFER_PTS(b), i * kFrame);
    gst_buffer_unref(b);
  }
  EXPECT_EQ(a.error(/*wait=*/0), "");
}

}  // namespace

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
