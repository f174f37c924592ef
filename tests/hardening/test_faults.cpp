// Fault injection: the backend fails on purpose (the engine's tests-only seam EngineConfig::testing_fault, reached
// through the element's object data "liveavatar-testing-fault", like the slow block model of the live tests) in the
// middle of a stream: a plain exception mid-block on the generation worker, a device out-of-memory error, a host
// allocation failure, a failure on the streaming thread itself. Each must give an element error that says what
// happened, within a bounded time; the pipeline then goes to NULL and plays again in the same process, this time
// without the fault, and gives every frame with the right timestamps.
#include <gst/app/gstappsink.h>
#include <gst/app/gstappsrc.h>
#include <gst/gst.h>
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

namespace {

constexpr GstClockTime kFrame = GST_SECOND / 25;
constexpr double kSeconds = 2.0;  // of speech per run: 50 frames
constexpr gint64 kBoundUs = 10 * G_USEC_PER_SEC;

struct Outcome {
  std::string error;            // the element's error message; empty: the stream ended with EOS
  std::string debug;            // its debug detail
  std::vector<GstClockTime> pts;
  double seconds = 0;           // from PLAYING to the error or EOS
  bool bounded = true;          // neither came within kBoundUs
};

class Faults : public ::testing::Test {
 protected:
  void SetUp() override {
    GError* err = nullptr;
    pipeline_ = gst_parse_launch(
        "appsrc name=img format=time caps=video/x-raw,format=RGB,width=160,height=128,framerate=0/1 ! la.image "
        "appsrc name=aud format=time caps=audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved ! la.audio "
        "liveavatar name=la ! appsink name=out sync=false wait-on-eos=false",  // EOS without pulling first
        &err);
    ASSERT_NE(pipeline_, nullptr) << (err ? err->message : "");
    la_ = gst_bin_get_by_name(GST_BIN(pipeline_), "la");
  }
  void TearDown() override {
    if (!pipeline_) return;
    gst_element_set_state(pipeline_, GST_STATE_NULL);
    gst_object_unref(la_);
    gst_object_unref(pipeline_);
  }

  // Arms (or with nullptr disarms) the fault and a slow block model (block_ms > 0), for the next start.
  void arm(const char* fault, int block_ms = 0) {
    g_object_set_data_full(G_OBJECT(la_), "liveavatar-testing-fault", fault ? g_strdup(fault) : nullptr, g_free);
    g_object_set_data(G_OBJECT(la_), "liveavatar-testing-block-delay-ms", GINT_TO_POINTER(block_ms));
  }

  // Plays a portrait and kSeconds of speech to EOS or an error, then goes to NULL.
  Outcome play() {
    Outcome o;
    const gint64 start = g_get_monotonic_time();
    gst_element_set_state(pipeline_, GST_STATE_PLAYING);  // a fault at start fails it: the error says why
    GstElement* img = gst_bin_get_by_name(GST_BIN(pipeline_), "img");
    GstElement* aud = gst_bin_get_by_name(GST_BIN(pipeline_), "aud");
    GstElement* out = gst_bin_get_by_name(GST_BIN(pipeline_), "out");
    GstBuffer* picture = gst_buffer_new_allocate(nullptr, 160 * 128 * 3, nullptr);
    gst_buffer_memset(picture, 0, 120, 160 * 128 * 3);
    GST_BUFFER_PTS(picture) = 0;
    gst_app_src_push_buffer(GST_APP_SRC(img), picture);
    gst_app_src_end_of_stream(GST_APP_SRC(img));
    const size_t total = static_cast<size_t>(kSeconds * 16000);
    for (size_t at = 0; at < total; at += 1600) {
      GstBuffer* b = gst_buffer_new_allocate(nullptr, 1600 * sizeof(float), nullptr);
      GstMapInfo m;
      gst_buffer_map(b, &m, GST_MAP_WRITE);
      for (size_t i = 0; i < 1600; ++i)
        reinterpret_cast<float*>(m.data)[i] = 0.3f * std::sin(2 * M_PI * 190.0 * (at + i) / 16000.0);
      gst_buffer_unmap(b, &m);
      GST_BUFFER_PTS(b) = gst_util_uint64_scale(at, GST_SECOND, 16000);
      GST_BUFFER_DURATION(b) = 100 * GST_MSECOND;
      gst_app_src_push_buffer(GST_APP_SRC(aud), b);
    }
    gst_app_src_end_of_stream(GST_APP_SRC(aud));
    GstBus* bus = gst_element_get_bus(pipeline_);
    GstMessage* m = gst_bus_timed_pop_filtered(bus, kBoundUs * GST_USECOND,
                                               static_cast<GstMessageType>(GST_MESSAGE_ERROR | GST_MESSAGE_EOS));
    o.seconds = (g_get_monotonic_time() - start) / 1e6;
    o.bounded = m != nullptr;
    if (m && GST_MESSAGE_TYPE(m) == GST_MESSAGE_ERROR) {
      GError* err = nullptr;
      gchar* dbg = nullptr;
      gst_message_parse_error(m, &err, &dbg);
      o.error = err->message;
      o.debug = dbg ? dbg : "";
      g_error_free(err);
      g_free(dbg);
    } else if (m) {
      while (GstSample* s = gst_app_sink_try_pull_sample(GST_APP_SINK(out), 0)) {
        o.pts.push_back(GST_BUFFER_PTS(gst_sample_get_buffer(s)));
        gst_sample_unref(s);
      }
    }
    if (m) gst_message_unref(m);
    gst_object_unref(bus);
    EXPECT_EQ(gst_element_set_state(pipeline_, GST_STATE_NULL), GST_STATE_CHANGE_SUCCESS);
    gst_object_unref(img);
    gst_object_unref(aud);
    gst_object_unref(out);
    return o;
  }

  // The same pipeline, without the fault: the whole stream, every frame at its time.
  void expect_clean_restart() {
    arm(nullptr);
    const Outcome o = play();
    ASSERT_TRUE(o.bounded) << "no EOS after the restart";
    ASSERT_EQ(o.error, "");
    ASSERT_EQ(o.pts.size(), static_cast<size_t>(kSeconds * 25));
    for (size_t i = 0; i < o.pts.size(); ++i) EXPECT_EQ(o.pts[i], i * kFrame) << "frame " << i;
  }

  GstElement* pipeline_ = nullptr;
  GstElement* la_ = nullptr;
};

// A model-like failure in the middle of a block, on the engine's worker (a slow block model: 12 frames per block).
TEST_F(Faults, BackendThrowsMidBlockOnTheWorker) {
  arm("error@30", /*block_ms=*/30);
  const Outcome o = play();
  ASSERT_TRUE(o.bounded) << "neither an error nor EOS within " << kBoundUs / 1e6 << " s";
  EXPECT_NE(o.error.find("Internal error in the avatar engine"), std::string::npos) << o.error;
  EXPECT_NE(o.error.find("failed in the middle of a block"), std::string::npos) << o.error;
  EXPECT_LT(o.seconds, 5.0);
  expect_clean_restart();
}

// The same on the streaming thread (the puppet renders inline, each frame when it is taken).
TEST_F(Faults, BackendThrowsOnTheStreamingThread) {
  arm("error@7");
  const Outcome o = play();
  ASSERT_TRUE(o.bounded);
  EXPECT_NE(o.error.find("failed in the middle of a block (injected fault at frame 7)"), std::string::npos) << o.error;
  expect_clean_restart();
}

// A device allocation failure (LibTorch's "CUDA out of memory") mid-block: an out-of-memory error that says what to
// change, the original text in the debug detail.
TEST_F(Faults, DeviceOutOfMemoryMidBlock) {
  arm("oom@17", /*block_ms=*/20);
  const Outcome o = play();
  ASSERT_TRUE(o.bounded);
  EXPECT_NE(o.error.find("Out of memory in the avatar engine"), std::string::npos) << o.error;
  EXPECT_NE(o.debug.find("CUDA out of memory"), std::string::npos) << o.debug;
  expect_clean_restart();
}

// A host allocation failure (std::bad_alloc) at the very first frame.
TEST_F(Faults, HostAllocationFailureAtTheFirstFrame) {
  arm("bad-alloc@0", /*block_ms=*/10);
  const Outcome o = play();
  ASSERT_TRUE(o.bounded);
  EXPECT_NE(o.error.find("Out of memory in the avatar engine"), std::string::npos) << o.error;
  expect_clean_restart();
}

// Several faults and restarts in a row on one pipeline: nothing carries over from one failed run to the next.
TEST_F(Faults, RepeatedFaultsAndRestarts) {
  const char* faults[] = {"error@0", "oom@49", "error@12", "bad-alloc@25"};
  for (const char* f : faults) {
    arm(f, /*block_ms=*/5);
    const Outcome o = play();
    ASSERT_TRUE(o.bounded) << f;
    EXPECT_NE(o.error, "") << f << ": the stream ended without the fault's error";
  }
  expect_clean_restart();
}

// A malformed fault spec is refused when the element starts (so the seam cannot silently test nothing).
TEST_F(Faults, MalformedSpecFailsTheStart) {
  arm("explode@3");
  const Outcome o = play();
  EXPECT_NE(o.error.find("testing_fault must be"), std::string::npos) << o.error;
  expect_clean_restart();
}

}  // namespace

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
