// Exceptions that are not the engine's own (here std::bad_alloc) must not end the process: the element posts an error
// and fails the state change or the stream. Allocation failures are simulated by replacing operator new in this
// executable (the plugin binds to it: the test is linked with export_dynamic).
#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <string>

namespace {

// Armed by the tests: every allocation of at least this many bytes fails (0: none), on any thread.
std::atomic<size_t> g_fail_from_bytes{0};
// Armed by the tests: every allocation on this thread fails.
thread_local bool t_fail_all = false;

}  // namespace

void* operator new(size_t n) {
  const size_t limit = g_fail_from_bytes.load();
  if (t_fail_all || (limit && n >= limit)) throw std::bad_alloc();
  if (void* p = std::malloc(n ? n : 1)) return p;
  throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }

namespace {

std::string error_text(GstMessage* m) {
  GError* err = nullptr;
  gst_message_parse_error(m, &err, nullptr);
  std::string text = err->message;
  g_error_free(err);
  return text;
}

// Out of memory while loading the backend (READY->PAUSED): the state change fails with an error that says so.
TEST(ElementErrors, OutOfMemoryWhileStartingFailsTheStateChange) {
  GstElement* e = gst_element_factory_make("liveavatar", nullptr);
  ASSERT_NE(e, nullptr);
  GstBus* bus = gst_bus_new();
  gst_element_set_bus(e, bus);
  ASSERT_EQ(gst_element_set_state(e, GST_STATE_READY), GST_STATE_CHANGE_SUCCESS);
  t_fail_all = true;
  const GstStateChangeReturn ret = gst_element_set_state(e, GST_STATE_PAUSED);
  t_fail_all = false;
  EXPECT_EQ(ret, GST_STATE_CHANGE_FAILURE);
  GstMessage* m = gst_bus_pop_filtered(bus, GST_MESSAGE_ERROR);
  ASSERT_NE(m, nullptr);
  EXPECT_NE(error_text(m).find("Out of memory"), std::string::npos) << error_text(m);
  gst_message_unref(m);
  // The element is usable again once memory is there.
  EXPECT_EQ(gst_element_set_state(e, GST_STATE_PAUSED), GST_STATE_CHANGE_SUCCESS);
  gst_element_set_state(e, GST_STATE_NULL);
  gst_object_unref(bus);
  gst_object_unref(e);
}

// Out of memory while streaming (a picture too big to convert): an error that says so, then EOS downstream.
TEST(ElementErrors, OutOfMemoryWhileStreamingIsAnElementError) {
  GstElement* e = gst_element_factory_make("liveavatar", nullptr);
  ASSERT_NE(e, nullptr);
  GstBus* bus = gst_bus_new();
  gst_element_set_bus(e, bus);
  GstHarness* audio = gst_harness_new_with_element(e, "audio", "src");
  GstHarness* image = gst_harness_new_with_element(e, "image", nullptr);
  gst_harness_set_live(audio, FALSE);
  gst_harness_set_live(image, FALSE);
  gst_harness_play(audio);
  gst_harness_set_src_caps_str(image, "video/x-raw,format=RGB,width=3000,height=2000,framerate=0/1");
  gst_harness_set_src_caps_str(audio, "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved");
  g_fail_from_bytes = 16u << 20;  // the 18 MB picture cannot be converted
  GstBuffer* picture = gst_buffer_new_allocate(nullptr, 3000 * 2000 * 3, nullptr);
  gst_buffer_memset(picture, 0, 128, 3000 * 2000 * 3);
  GST_BUFFER_PTS(picture) = 0;
  gst_harness_push(image, picture);
  gst_harness_push_event(image, gst_event_new_eos());
  GstBuffer* samples = gst_buffer_new_allocate(nullptr, 640 * sizeof(float), nullptr);
  gst_buffer_memset(samples, 0, 0, 640 * sizeof(float));
  GST_BUFFER_PTS(samples) = 0;
  gst_harness_push(audio, samples);
  GstMessage* m = gst_bus_timed_pop_filtered(bus, 10 * GST_SECOND, GST_MESSAGE_ERROR);
  g_fail_from_bytes = 0;
  ASSERT_NE(m, nullptr);
  EXPECT_NE(error_text(m).find("Out of memory"), std::string::npos) << error_text(m);
  gst_message_unref(m);
  gst_harness_teardown(image);
  gst_harness_teardown(audio);
  gst_object_unref(bus);
  gst_object_unref(e);
}

}  // namespace

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
