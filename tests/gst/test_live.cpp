// Live timing of the element: the latency it reports (puppet: one frame; a block model: a block + its processing,
// raised with a LATENCY message), no busy loop while a block is made, and lag-policy when the model cannot keep up.
// The model is stood in for by the tests-only slow puppet (object data "liveavatar-testing-block-delay-ms": blocks
// of 12 frames on the engine's worker, a fixed time per block), so no weights are needed.
#include "live_util.h"

using namespace liveutil;


TEST(Latency, PuppetAnswersOneFrame) {
  const LiveRun r = run_live("", 0, 1.0);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 1.0);
  EXPECT_EQ(r.latency_in_stream, kSource + kFrame);
  EXPECT_EQ(r.latency_messages_playing, 0) << "the puppet's figure does not change";
}

// A block model that keeps up (300 ms per 480 ms block): the latency is a block and then a block + its processing,
// raised with a LATENCY message; the frames come at that latency; no busy loop while a block is made.
TEST(Latency, BlockModelReportsBlockPlusProcessingWithoutBusyLoop) {
  const LiveRun r = run_live("", 300, 3.0);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 3.0);
  EXPECT_GE(r.latency_in_stream, kSource + kBlock + 300 * GST_MSECOND);
  EXPECT_LT(r.latency_in_stream, kSource + kBlock + 2 * 300 * GST_MSECOND);
  EXPECT_GE(r.latency_messages_playing, 1) << "the measured processing raised the latency";
  EXPECT_LT(worst_delay(r), r.latency_at_end + 100 * GST_MSECOND);
  EXPECT_LT(r.cpu, 0.3 * r.wall) << "CPU " << r.cpu << " s in " << r.wall << " s: a busy loop?";
}

// The first block takes 2 s while the latency still says 520 ms: the first frame is overdue for more than a second,
// and the element waits for it on the engine (wait_frame), not by spinning through the aggregator.
TEST(Latency, NoBusyLoopWhileALateBlockIsMade) {
  const LiveRun r = run_live("lag-policy=wait", 2000, 0.4);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 0.4);
  EXPECT_GT(r.wall_first, 1.5) << "the first frame came late: the element had to wait";
  EXPECT_LT(r.cpu_first, 0.25 * r.wall_first)
      << "CPU " << r.cpu_first << " s in the " << r.wall_first << " s before the first frame: a busy loop?";
}

// A block model slower than real time (700 ms per 480 ms block), lag-policy=wait: every model frame is shown, the
// latency grows and is reported; the element waits for the late frames without spinning.
TEST(LagPolicy, WaitShowsEveryFrameAndTheLatencyGrows) {
  const LiveRun r = run_live("lag-policy=wait", 700, 4.0);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 4.0);
  EXPECT_EQ(r.qos_dropped, 0u);
  EXPECT_GE(r.latency_messages_playing, 2);
  EXPECT_GT(r.latency_at_end, kSource + kBlock + 2 * 700 * GST_MSECOND) << "blocks queued: the latency grew";
  EXPECT_GT(worst_delay(r), kBlock + 700 * GST_MSECOND + 500 * GST_MSECOND);
  EXPECT_LT(r.cpu, 0.3 * r.wall) << "CPU " << r.cpu << " s in " << r.wall << " s: a busy loop while waiting?";
}

// lag-policy=drop: frames not made in time repeat the last frame, the model skips what it cannot make in time; the
// output keeps its pace (no frame later than the reported latency) and the reported latency stays bounded.
TEST(LagPolicy, DropKeepsThePaceByRepeatingFrames) {
  const LiveRun r = run_live("lag-policy=drop", 700, 4.0);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 4.0);
  EXPECT_GT(r.qos_dropped, 0u);
  EXPECT_GT(r.qos_processed, 0u);
  EXPECT_LE(r.qos_processed, r.frames.size());
  EXPECT_LE(r.latency_at_end, kSource + kBlock + kFrame + 800 * GST_MSECOND);
  EXPECT_LT(worst_delay(r), r.latency_at_end + 250 * GST_MSECOND);
  EXPECT_GE(repeated_frames(r), static_cast<int>(r.qos_dropped) / 2);
}

// lag-policy=puppet: the puppet draws the frames the model does not make in time; same pace and bounds as drop.
TEST(LagPolicy, PuppetStandsInAndKeepsThePace) {
  const LiveRun r = run_live("lag-policy=puppet", 700, 4.0);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, 4.0);
  EXPECT_GT(r.qos_dropped, 0u);
  EXPECT_LE(r.latency_at_end, kSource + kBlock + kFrame + 800 * GST_MSECOND);
  EXPECT_LT(worst_delay(r), r.latency_at_end + 250 * GST_MSECOND);
  EXPECT_LT(repeated_frames(r), static_cast<int>(r.qos_dropped) / 2) << "stand-in frames move, unlike drop";
}

// The stats messages while the speech plays (from its second block on): their lowest and last step counts, and the
// largest queues.
struct StepsSeen {
  int min = 1 << 30, last = 0, full = 0;
  gint64 max_pending = 0, max_queued = 0;
};
static StepsSeen steps_seen(const LiveRun& r) {
  StepsSeen s;
  for (const auto& x : r.stats) {
    if (x.at < r.first_pts + kBlock) continue;
    s.min = std::min(s.min, x.steps);
    s.last = x.steps;
    s.full = x.steps_full;
    s.max_pending = std::max(s.max_pending, x.frames_pending);
    s.max_queued = std::max(s.max_queued, x.frames_queued);
  }
  return s;
}

// lag-policy=degrade: a model slower than real time at its full 4 steps (700 ms per 480 ms block) runs fewer steps
// (2: 350 ms) once a block shows it is behind; after that first lag every frame is the model's and in time, at
// exactly 25 fps, with the queues bounded and the latency at source + block + processing + frame.
TEST(LagPolicy, DegradeRunsFewerStepsAndKeepsUp) {
  const double seconds = 6.0;
  const LiveRun r = run_live("lag-policy=degrade stats-interval=200", 700, seconds);
  std::printf("degrade: %zu frames, %" G_GUINT64_FORMAT " replaced, lowest steps %d, last %d, latency %" GST_TIME_FORMAT
              "\n", r.frames.size(), r.qos_dropped, steps_seen(r).min, steps_seen(r).last,
              GST_TIME_ARGS(r.latency_at_end));
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, seconds);
  const StepsSeen s = steps_seen(r);
  ASSERT_FALSE(r.stats.empty()) << "no liveavatar-stats messages";
  EXPECT_EQ(s.full, 4);
  EXPECT_LT(s.min, 4) << "the model never ran fewer steps";
  EXPECT_GE(s.min, 1);
  // Once degraded the model keeps up: no frame of the last half of the speech was replaced.
  for (GstClockTime rt : r.replaced)
    EXPECT_LT(rt, r.first_pts + static_cast<GstClockTime>(seconds / 2 * GST_SECOND)) << "replaced late in the stream";
  // The frames due before the first (4-step) block is measured, and those its lateness made stale, are replaced.
  EXPECT_LT(r.qos_dropped, r.frames.size() * 2 / 5) << "most frames must be the model's";
  EXPECT_LE(s.max_pending, 4 * 12) << "audio piled up in the engine";
  EXPECT_LE(s.max_queued, 25);
  EXPECT_LE(r.latency_at_end, kSource + kBlock + kFrame + 800 * GST_MSECOND);
  EXPECT_LT(worst_delay(r), r.latency_at_end + 250 * GST_MSECOND);
  // Frames come a block at a time, so one stats message's rate swings with the bursts: the rate is taken over the
  // speech's second half, from the stats' frame counter, between the first and the last message of that half that
  // follow a block's frames (whole blocks in between; the ends known to one stats interval).
  const Stats* a = nullptr;
  const Stats* b = nullptr;
  int n = 0;
  for (size_t i = 1; i < r.stats.size(); ++i) {
    const Stats& x = r.stats[i];
    if (x.at > r.first_pts + static_cast<GstClockTime>(seconds / 2 * GST_SECOND) &&
        x.at < r.first_pts + static_cast<GstClockTime>(seconds * GST_SECOND)) {
      ++n;
      if (x.frames == r.stats[i - 1].frames) continue;
      if (!a) a = &x;
      b = &x;
    }
  }
  ASSERT_GT(n, 5);
  ASSERT_NE(a, nullptr);
  ASSERT_GT(b->at, a->at + GST_SECOND);
  const double fps = static_cast<double>(b->frames - a->frames) * GST_SECOND / static_cast<double>(b->at - a->at);
  std::printf("degrade: %.1f fps over the second half (%d stats)\n", fps, n);
  EXPECT_NEAR(fps, 25.0, 5.0) << "the stats' frame rate";
}

// Slow for the first 3 blocks (700 ms), then a tenth of that: degrade lowers the steps while behind and comes back
// to the full 4 once the model keeps up.
TEST(LagPolicy, DegradeReturnsToTheFullStepsOnceTheModelKeepsUp) {
  const double seconds = 6.0;
  const LiveRun r = run_live("lag-policy=degrade stats-interval=200", 700, seconds, /*slow_blocks=*/3);
  ASSERT_EQ(r.error, "");
  expect_exact_frames(r, seconds);
  int min_steps = 1 << 30;
  for (const auto& x : r.stats) min_steps = std::min(min_steps, x.steps);
  EXPECT_LT(min_steps, 4) << "the slow blocks did not lower the steps";
  ASSERT_FALSE(r.stats.empty());
  EXPECT_EQ(r.stats.back().steps, 4) << "the steps did not come back once the model kept up";
}

// Other policies always run the full steps, however late the model is.
TEST(LagPolicy, DropKeepsTheFullSteps) {
  const LiveRun r = run_live("lag-policy=drop stats-interval=200", 700, 2.0);
  ASSERT_EQ(r.error, "");
  for (const auto& x : r.stats) EXPECT_EQ(x.steps, 4);
}

// The stats messages of a run of the example speech through the element (not live, puppet): (audio time, speaking)
// pairs, the VAD's kind, and the warnings the element posted.
struct SpeakingRun {
  std::vector<std::pair<GstClockTime, bool>> speaking;
  std::string vad;
  std::vector<std::string> warnings;
  std::string error;
};
static SpeakingRun run_speech(const std::string& props) {
  const std::string launch = "filesrc location=" + std::string(LIVEAVATAR_ASSETS_DIR) +
                             "/portrait.png ! pngdec ! videoconvert ! la.image filesrc location=" +
                             std::string(LIVEAVATAR_ASSETS_DIR) +
                             "/speech.wav ! wavparse ! audioconvert ! audioresample ! la.audio liveavatar name=la "
                             "width=64 height=64 " + props + " ! fakesink sync=false";
  GError* err = nullptr;
  GstElement* pipe = gst_parse_launch(launch.c_str(), &err);
  SpeakingRun r;
  EXPECT_EQ(err, nullptr) << (err ? err->message : "");
  if (!pipe) return r;
  GstBus* bus = gst_element_get_bus(pipe);
  gst_element_set_state(pipe, GST_STATE_PLAYING);
  for (bool done = false; !done;) {
    GstMessage* m = gst_bus_timed_pop(bus, 120 * GST_SECOND);
    if (!m) break;
    switch (GST_MESSAGE_TYPE(m)) {
      case GST_MESSAGE_ELEMENT: {
        const GstStructure* st = gst_message_get_structure(m);
        guint64 at = 0;
        gboolean speaking = FALSE;
        if (gst_structure_has_name(st, "liveavatar-stats") && gst_structure_get_uint64(st, "audio-time", &at) &&
            gst_structure_get_boolean(st, "speaking", &speaking)) {
          r.speaking.emplace_back(at, speaking);
          r.vad = gst_structure_get_string(st, "vad");
        }
        break;
      }
      case GST_MESSAGE_WARNING: {
        GError* e = nullptr;
        gst_message_parse_warning(m, &e, nullptr);
        r.warnings.push_back(e->message);
        g_error_free(e);
        break;
      }
      case GST_MESSAGE_ERROR: {
        GError* e = nullptr;
        gst_message_parse_error(m, &e, nullptr);
        r.error = e->message;
        g_error_free(e);
        done = true;
        break;
      }
      case GST_MESSAGE_EOS:
        done = true;
        break;
      default:
        break;
    }
    gst_message_unref(m);
  }
  gst_element_set_state(pipe, GST_STATE_NULL);
  gst_object_unref(bus);
  gst_object_unref(pipe);
  return r;
}

// The example speech talks to 6.9 s, pauses to 8.7 s, talks to 17.1 s, pauses to 19.1 s, talks to 26.2 s, and is
// silent to 27.5 s: the stats say speaking in the middle of the talk and not in the middle of the pauses.
static void expect_speaking_in_the_right_places(const SpeakingRun& r) {
  ASSERT_EQ(r.error, "");
  ASSERT_GE(r.speaking.size(), 20u) << "too few stats messages";
  int talk = 0, talk_yes = 0, pause = 0, pause_yes = 0;
  auto within = [](GstClockTime t, double a, double b) {
    return t >= static_cast<GstClockTime>(a * GST_SECOND) && t <= static_cast<GstClockTime>(b * GST_SECOND);
  };
  for (const auto& [t, speaking] : r.speaking) {
    if (within(t, 1.0, 6.0) || within(t, 10.0, 16.5) || within(t, 20.0, 25.5)) {
      ++talk;
      talk_yes += speaking;
    }
    if (within(t, 7.4, 8.5) || within(t, 17.6, 18.9) || within(t, 26.7, 27.5)) {
      ++pause;
      pause_yes += speaking;
    }
  }
  ASSERT_GE(talk, 5);
  ASSERT_GE(pause, 3);
  EXPECT_GE(talk_yes, talk * 9 / 10) << talk_yes << " of " << talk << " stats in the talk say speaking";
  EXPECT_EQ(pause_yes, 0) << pause_yes << " of " << pause << " stats in the pauses say speaking";
}

TEST(Stats, SpeakingFollowsTheSpeechWithSilero) {
  if (!LIVEAVATAR_HAVE_TORCH) GTEST_SKIP() << "built without LibTorch (the sanitizer build): the energy gate only";
  const SpeakingRun r = run_speech("stats-interval=1");
  EXPECT_EQ(r.vad, "silero");
  EXPECT_TRUE(r.warnings.empty()) << r.warnings.front();
  expect_speaking_in_the_right_places(r);
}

// Without the model file (or without LibTorch) the energy gate decides, after one warning that says what to install
// (or that this build cannot run the model).
TEST(Stats, WithoutTheModelTheEnergyGateDecidesAfterOneWarning) {
  const SpeakingRun r = run_speech("stats-interval=1 vad-model=/nonexistent/silero_vad.jit");
  EXPECT_EQ(r.vad, "energy");
  ASSERT_EQ(r.warnings.size(), 1u);
  EXPECT_NE(r.warnings[0].find(LIVEAVATAR_HAVE_TORCH ? "silero-vad" : "without LibTorch"), std::string::npos)
      << r.warnings[0];
  expect_speaking_in_the_right_places(r);
}

int main(int argc, char** argv) {
  gst_init(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
