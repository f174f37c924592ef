// The element's state cycles: one element taken NULL -> PLAYING -> (a short stream) -> NULL many times, sometimes
// stopped mid-stream, sometimes after EOS, sometimes only to READY or PAUSED. Every cycle must give the same frames,
// and nothing may pile up across cycles: GStreamer's leaks tracer counts the GstObjects and GstMiniObjects alive
// (none made after the first few cycles may still be alive), and in the sanitizer build LeakSanitizer checks every
// heap allocation at exit (scripts/sanitize.sh; suppressions in tests/hardening/lsan.supp).
#include <gst/check/gstharness.h>
#include <gst/gst.h>
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <string>
#include <vector>

namespace {

constexpr int kCycles = 40;
const char kAudioCaps[] = "audio/x-raw,format=F32LE,rate=16000,channels=1,layout=interleaved";
const char kImageCaps[] = "video/x-raw,format=RGB,width=160,height=128,framerate=0/1";

GstBuffer* picture() {
  GstBuffer* buf = gst_buffer_new_allocate(nullptr, 160 * 128 * 3, nullptr);
  GstMapInfo m;
  gst_buffer_map(buf, &m, GST_MAP_WRITE);
  for (size_t i = 0; i < m.size; ++i) m.data[i] = static_cast<guint8>((i * 7) % 251);
  gst_buffer_unmap(buf, &m);
  GST_BUFFER_PTS(buf) = 0;
  return buf;
}

GstBuffer* speech(GstClockTime pts, size_t n) {
  GstBuffer* buf = gst_buffer_new_allocate(nullptr, n * sizeof(float), nullptr);
  GstMapInfo m;
  gst_buffer_map(buf, &m, GST_MAP_WRITE);
  auto* s = reinterpret_cast<float*>(m.data);
  const guint64 first = gst_util_uint64_scale(pts, 16000, GST_SECOND);
  for (size_t i = 0; i < n; ++i) s[i] = 0.3f * std::sin(2 * M_PI * 200.0 * (first + i) / 16000.0);
  gst_buffer_unmap(buf, &m);
  GST_BUFFER_PTS(buf) = pts;
  GST_BUFFER_DURATION(buf) = gst_util_uint64_scale(n, GST_SECOND, 16000);
  return buf;
}

void start_stream(GstHarness* h, const char* id, const char* caps) {
  gst_harness_push_event(h, gst_event_new_stream_start(id));
  GstCaps* c = gst_caps_from_string(caps);
  gst_harness_push_event(h, gst_event_new_caps(c));  // the event takes its own reference
  gst_caps_unref(c);
  GstSegment seg;
  gst_segment_init(&seg, GST_FORMAT_TIME);
  gst_harness_push_event(h, gst_event_new_segment(&seg));
}

GstTracer* leaks_tracer() {
  GList* tracers = gst_tracing_get_active_tracers();
  GstTracer* found = nullptr;
  for (GList* l = tracers; l; l = l->next)
    if (!found && g_str_has_prefix(G_OBJECT_TYPE_NAME(l->data), "GstLeaksTracer"))
      found = GST_TRACER(gst_object_ref(l->data));
  g_list_free_full(tracers, gst_object_unref);
  return found;
}

// Starts the leaks tracer's record of objects created from now on (false: no tracer).
bool start_tracking() {
  GstTracer* t = leaks_tracer();
  if (!t) return false;
  g_signal_emit_by_name(t, "activity-start-tracking");
  gst_object_unref(t);
  return true;
}

// GstObjects and GstMiniObjects created since start_tracking() and still alive, as "type @ address" lines.
std::vector<std::string> created_and_alive() {
  std::vector<std::string> out;
  GstTracer* t = leaks_tracer();
  if (!t) return {"no leaks tracer"};
  GstStructure* info = nullptr;
  g_signal_emit_by_name(t, "activity-get-checkpoint", &info);
  g_signal_emit_by_name(t, "activity-stop-tracking");
  gst_object_unref(t);
  // The lists hold {type-name, address}; an object made and freed within the window is in both.
  auto entries = [&](const char* field) {
    std::multiset<std::string> set;
    const GValue* list = info ? gst_structure_get_value(info, field) : nullptr;
    for (guint i = 0; list && i < gst_value_list_get_size(list); ++i) {
      const GstStructure* o = gst_value_get_structure(gst_value_list_get_value(list, i));
      const gchar* type = gst_structure_get_string(o, "type-name");
      const gchar* address = gst_structure_get_string(o, "address");
      set.insert(std::string(type ? type : "?") + " @ " + (address ? address : "?"));
    }
    return set;
  };
  std::multiset<std::string> created = entries("objects-created-list");
  for (const auto& r : entries("objects-removed-list")) {
    auto it = created.find(r);
    if (it != created.end()) created.erase(it);
  }
  out.assign(created.begin(), created.end());
  if (info) gst_structure_free(info);
  return out;
}

// Frames a cycle gave, with their timestamps.
std::vector<GstClockTime> run_cycle(GstElement* e, GstHarness* audio, GstHarness* image, int cycle) {
  std::vector<GstClockTime> pts;
  EXPECT_EQ(gst_element_set_state(e, GST_STATE_PLAYING), GST_STATE_CHANGE_SUCCESS) << "cycle " << cycle;
  start_stream(image, "image", kImageCaps);
  start_stream(audio, "audio", kAudioCaps);
  EXPECT_EQ(gst_harness_push(image, picture()), GST_FLOW_OK);
  gst_harness_push_event(image, gst_event_new_eos());
  // 0.5 s of speech in 0.1 s buffers; every fourth cycle stops mid-stream (no EOS), the others end with EOS.
  const bool to_eos = cycle % 4 != 3;
  for (int i = 0; i < 5; ++i)
    EXPECT_EQ(gst_harness_push(audio, speech(i * GST_SECOND / 10, 1600)), GST_FLOW_OK) << "cycle " << cycle;
  if (to_eos) {
    gst_harness_push_event(audio, gst_event_new_eos());
    for (gint64 end = g_get_monotonic_time() + 20 * G_USEC_PER_SEC; g_get_monotonic_time() < end;) {
      bool eos = false;
      while (GstEvent* ev = gst_harness_try_pull_event(audio)) {
        eos |= GST_EVENT_TYPE(ev) == GST_EVENT_EOS;
        gst_event_unref(ev);
      }
      while (GstBuffer* b = gst_harness_try_pull(audio)) {
        pts.push_back(GST_BUFFER_PTS(b));
        gst_buffer_unref(b);
      }
      if (eos) break;
      g_usleep(1000);
    }
  } else {
    g_usleep(20000);  // let it be in the middle of something
  }
  // Down to NULL through a different path each time: straight, or pausing at PAUSED / READY first.
  if (cycle % 3 == 1) gst_element_set_state(e, GST_STATE_PAUSED);
  if (cycle % 3 == 2) gst_element_set_state(e, GST_STATE_READY);
  EXPECT_EQ(gst_element_set_state(e, GST_STATE_NULL), GST_STATE_CHANGE_SUCCESS) << "cycle " << cycle;
  // What was left in the harness queues belongs to the stopped stream.
  while (GstBuffer* b = gst_harness_try_pull(audio)) gst_buffer_unref(b);
  while (GstEvent* ev = gst_harness_try_pull_event(audio)) gst_event_unref(ev);
  return pts;
}

TEST(StateCycles, SameFramesEveryCycleAndNothingPilesUp) {
  GstElement* e = gst_element_factory_make("liveavatar", nullptr);
  ASSERT_NE(e, nullptr) << "liveavatar plugin not found (GST_PLUGIN_PATH)";
  GstHarness* audio = gst_harness_new_with_element(e, "audio", "src");
  GstHarness* image = gst_harness_new_with_element(e, "image", nullptr);
  gst_object_ref(e);  // kept until after the harnesses are gone
  gst_harness_set_live(audio, FALSE);
  gst_harness_set_live(image, FALSE);
  gst_element_set_state(e, GST_STATE_NULL);

  std::vector<GstClockTime> expected;
  for (int i = 0; i < 13; ++i) expected.push_back(i * GST_SECOND / 25);  // 0.5 s -> ceil(12.5) = 13 frames
  bool tracking = false;
  for (int cycle = 0; cycle < kCycles; ++cycle) {
    const std::vector<GstClockTime> pts = run_cycle(e, audio, image, cycle);
    if (cycle % 4 != 3) EXPECT_EQ(pts, expected) << "cycle " << cycle;
    if (cycle == 3) tracking = start_tracking();  // after every kind of cycle once: caches are warm
  }
  // Everything the cycles made must go with the element and its harnesses (they hold the last stream's sticky
  // events and caps until then).
  gst_harness_teardown(image);
  gst_harness_teardown(audio);
  gst_object_unref(e);
  ASSERT_TRUE(tracking) << "the leaks tracer is not active";
  const std::vector<std::string> alive = created_and_alive();
  std::string list;
  for (const auto& a : alive) list += "\n  " + a;
  EXPECT_TRUE(alive.empty()) << alive.size() << " objects made in cycles 4.." << kCycles << " outlive the element:" << list;
}

}  // namespace

int main(int argc, char** argv) {
  g_setenv("GST_TRACERS", "leaks", /*overwrite=*/TRUE);
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  const int rc = RUN_ALL_TESTS();
  gst_deinit();  // so LeakSanitizer sees only what outlives GStreamer's own teardown
  return rc;
}
